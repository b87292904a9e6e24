"""`vlmkit batch --ray` on a local Ray cluster started in this process (two CPUs, two model replicas):
the 104-row file gives the same results as the local job, resuming from an output the local job had
half written; and `BatchPredictor` runs in a user's own `map_batches` pipeline. One test: Ray starts slowly."""

import json

import pytest
import torch
from batch_support import CONCURRENCY, batch_rows, comparable, read_output, run_in_process, serve_config, write_rows

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'vlmkit[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'vlmkit[ray]')")


def test_the_batch_file_on_two_ray_replicas_equals_the_local_run(janus_dir, tmp_path):
    from vlmkit.batch import BatchPredictor, run_batch_on_ray

    source = write_rows(tmp_path / "requests.jsonl", batch_rows())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_in_process(janus_dir, source, tmp_path / "local.jsonl")
    finally:
        torch.set_num_threads(threads)
    local = read_output(tmp_path / "local.jsonl")
    output = tmp_path / "ray.jsonl"
    output.write_text("".join(json.dumps(line) + "\n" for line in local[:40]))  # a job stopped part way

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        report = run_batch_on_ray(serve_config(janus_dir), source, output, replicas=2, num_cpus_per_replica=1,
                                  concurrency=CONCURRENCY, progress=False)
        assert (report.already_done, report.written) == (40, 64)
        assert comparable(read_output(output)) == comparable(local)

        # the callable class in a pipeline of the user's own, rows as columns
        rows = [{"custom_id": f"own-{i}", "url": "/v1/chat/completions",
                 "body": {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 4,
                          "temperature": 0, "seed": None}} for i in (0, 7)]
        own = ray.data.from_items(rows).map_batches(
            BatchPredictor, fn_constructor_kwargs={"model": str(janus_dir)}, compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=2, num_cpus=1)
        answers = {row["custom_id"]: json.loads(row["output"]) for row in own.iter_rows()}
    finally:
        ray.shutdown()
    batch = comparable(local)
    for i in (0, 7):
        line = answers[f"own-{i}"]
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"] == batch[f"greedy-{i}"][1]["choices"]
