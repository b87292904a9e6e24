"""`vlmkit batch` on the tiny Janus checkpoint: a 104-row OpenAI batch file (chat about images, text
chat greedy and sampled, image generation, bad rows) gives one output line per row with the server's
statuses and messages; rows equal the same requests sent one at a time; a job killed with SIGKILL and
run again equals an uninterrupted one; the output file recovers from a torn line; the offline `LLM`
API and the throughput figures run on the same path."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
from batch_support import (STATUSES, batch_rows, cli_flags, comparable, kind, read_output, run_in_process,
                           serve_config, write_rows)
from PIL import Image
from serve_support import data_uri, engine_for, image_part, serve, served_text, user

from vlmkit.batch import LLM, BatchFileError, ResultsFile, SamplingParams, derived_seed
from vlmkit.batch.rows import BatchRequest, BatchWorker
from vlmkit.bench.batch_throughput import batch_throughput
from vlmkit.cli import main


# One torch thread: these models are tiny, and on a small shared machine a second OpenMP thread per
# caller mostly waits for a busy core (measured: 3x slower runs under load, no gain when idle).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (conftest.py)


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("batch") / "requests.jsonl", batch_rows())


@pytest.fixture(scope="module")
def uninterrupted(janus_dir, batch_file):
    """The whole file run in one go, in process: its output lines."""
    output, stats = batch_file.parent / "uninterrupted.jsonl", {}
    report = run_in_process(janus_dir, batch_file, output, stats=stats)
    assert (report.total, report.written, report.already_done) == (104, 104, 0)
    assert stats["max_requests_in_step"] > 1 and stats["batched_steps"] > 0  # rows shared the model's steps
    return read_output(output)


def test_every_row_gets_one_output_line_with_the_servers_status(uninterrupted):
    assert len(uninterrupted) == 104
    assert Counter(line["custom_id"] for line in uninterrupted) == Counter(row["custom_id"] for row in batch_rows())
    for line in uninterrupted:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["id"].startswith("batch_req_")
        assert line["response"]["request_id"].startswith("req_")
        status = line["response"]["status_code"]
        assert status == STATUSES[kind(line["custom_id"])], line
        assert (line["error"] is None) == (status == 200)
        if line["error"]:
            assert line["error"]["message"] == line["response"]["body"]["error"]["message"]


def test_chat_rows_carry_usage_and_image_rows_decode_to_pngs(uninterrupted):
    for line in uninterrupted:
        body, family = line["response"]["body"], kind(line["custom_id"])
        if family in ("see", "greedy", "seeded", "sampled"):
            assert body["object"] == "chat.completion" and len(body["choices"]) == 1
            usage = body["usage"]
            assert 1 <= usage["completion_tokens"] <= 4 and usage["prompt_tokens"] > 0
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        elif family == "draw":
            image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
            assert image.format == "PNG" and image.size == (8, 8)


def test_bad_rows_get_the_servers_own_messages(janus_dir, uninterrupted):
    answers = {line["custom_id"]: line["response"] for line in uninterrupted}
    assert "messages: Field required" in answers["bad-no-messages"]["body"]["error"]["message"]
    assert "--max-images" in answers["bad-too-many-images"]["body"]["error"]["message"]
    assert "--media-root" in answers["bad-local-path"]["body"]["error"]["message"]
    assert "--max-body-bytes" in answers["bad-too-large"]["body"]["error"]["message"]
    config = serve_config(janus_dir)
    rows = {row["custom_id"]: row for row in batch_rows()}
    with serve(janus_dir, limits=vars(config.limits)) as server:  # the HTTP server with the same limits
        for custom_id, answer in answers.items():
            # bad-url: the handler names the two endpoints, where the router only says "no route";
            # bad-too-large: over HTTP the size counts the client's JSON spacing
            if not custom_id.startswith("bad-") or custom_id in ("bad-url", "bad-too-large"):
                continue
            row = rows[custom_id]
            response = httpx.request(row["method"], server.url + row["url"], json=row["body"], timeout=60)
            assert (response.status_code, response.json()) == (answer["status_code"], answer["body"]), custom_id


def test_rows_equal_the_same_requests_sent_one_at_a_time(janus_dir, uninterrupted):
    """Greedy rows, rows with a seed and rows with the seed derived from their custom_id: alone on the
    model they give what they gave sharing batches with everything else."""
    batched = comparable(uninterrupted)
    with BatchWorker(engine_for(janus_dir), serve_config(janus_dir), concurrency=1) as worker:
        for row in batch_rows():
            if row["custom_id"].startswith("bad-"):
                continue
            status, body = worker.answer(BatchRequest.from_row(row))
            alone = comparable([{"custom_id": row["custom_id"], "response": {"status_code": status, "body": body}}])
            assert alone[row["custom_id"]] == batched[row["custom_id"]], row["custom_id"]


def test_greedy_rows_equal_engine_chat(janus_dir, uninterrupted):
    engine = engine_for(janus_dir)
    bodies = {line["custom_id"]: line["response"]["body"] for line in uninterrupted}
    for i in (0, 7):
        expected = engine.chat([{"role": "user", "content": [{"type": "text", "text": f"Count to {i}."}]}],
                               max_new_tokens=4)
        assert bodies[f"greedy-{i}"]["choices"][0]["message"]["content"] == served_text(engine, expected.text)


def test_a_job_killed_with_sigkill_and_run_again_equals_an_uninterrupted_run(janus_dir, batch_file, uninterrupted,
                                                                            tmp_path):
    output = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "vlmkit.cli", "batch", "--model", str(janus_dir), "--input", str(batch_file),
               "--output", str(output), *cli_flags()]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline:
        if output.exists() and output.read_bytes().count(b"\n") >= 104 // 3:
            job.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    job.wait(30)
    assert job.returncode == -signal.SIGKILL, "the job finished before a third of the rows were written"
    written_before = output.read_bytes().count(b"\n")
    assert 104 // 3 <= written_before < 104

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{written_before} were already there" in rerun.stderr and "104/104 done" in rerun.stderr
    assert comparable(read_output(output)) == comparable(uninterrupted)  # nothing lost, doubled or changed

    # a finished job does nothing
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert again.returncode == 0 and "0 row(s) written" in again.stderr
    assert len(read_output(output)) == 104


def test_a_torn_last_line_is_cut_off_and_its_row_runs_again(janus_dir, tmp_path):
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": user(f"Hi {i}"), "max_tokens": 2, "temperature": 0}} for i in range(3)]
    source = write_rows(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out.jsonl"
    run_in_process(janus_dir, source, output)
    whole = output.read_bytes()
    lines = whole.splitlines(keepends=True)
    output.write_bytes(b"".join(lines[:2]) + lines[2][:25])  # a kill mid-write
    report = run_in_process(janus_dir, source, output)
    assert (report.already_done, report.written) == (2, 1)
    assert comparable(read_output(output)) == comparable([json.loads(line) for line in whole.splitlines()])


def test_duplicate_custom_ids_and_lines_without_one_are_refused_before_any_model_loads(tmp_path, capsys):
    rows = ['{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}',
            '{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}',
            '{"url": "/v1/chat/completions"}', "{not json"]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(rows) + "\n")
    code = main(["batch", "--model", str(tmp_path / "no-such-model"), "--input", str(source),
                 "--output", str(tmp_path / "out.jsonl")])
    message = capsys.readouterr().err
    assert code == 1 and "3 line(s) cannot be run" in message
    assert "line 2: custom_id 'a' is already used on line 1" in message
    assert "line 3: custom_id is missing" in message and "line 4: not valid JSON" in message
    assert not (tmp_path / "out.jsonl").exists()


def test_an_output_of_another_job_or_in_use_is_refused(tmp_path):
    (tmp_path / "out.jsonl").write_text(json.dumps({"custom_id": "zzz", "response": {}}) + "\n")
    with pytest.raises(BatchFileError, match="another job"):
        ResultsFile(tmp_path / "out.jsonl").open({"a", "b"})
    with ResultsFile(tmp_path / "other.jsonl") as first:
        first.open()
        with pytest.raises(BatchFileError, match="another vlmkit batch job is writing"):
            ResultsFile(tmp_path / "other.jsonl").open()


def test_local_images_need_a_media_root_and_resolve_inside_it(janus_dir, tmp_path, sample_images):
    (tmp_path / "media").mkdir()
    sample_images["square"].save(tmp_path / "media" / "square.png")
    rows = [{"custom_id": name, "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": user(image_part(path), "What is it?"), "max_tokens": 2, "temperature": 0}}
            for name, path in (("relative", "square.png"), ("outside", str(tmp_path / "in.jsonl")))]
    source = write_rows(tmp_path / "in.jsonl", rows)
    run_in_process(janus_dir, source, tmp_path / "out.jsonl", media_root=str(tmp_path / "media"))
    answers = {line["custom_id"]: line["response"] for line in read_output(tmp_path / "out.jsonl")}
    assert answers["relative"]["status_code"] == 200
    assert answers["outside"]["status_code"] == 400 and "outside media_root" in \
        answers["outside"]["body"]["error"]["message"]


def test_derived_seeds_are_stable_and_differ_between_rows():
    assert derived_seed("row-1") == derived_seed("row-1") != derived_seed("row-2")
    assert 0 <= derived_seed("row-1") < 2 ** 63
    request = BatchRequest.from_row({"custom_id": "x", "url": "/v1/chat/completions", "body": {"seed": 3}})
    assert request.body["seed"] == 3


def test_llm_chat_and_generate_images_answer_as_the_batch_rows(janus_dir, uninterrupted):
    bodies = {line["custom_id"]: line["response"]["body"] for line in uninterrupted}
    llm = LLM.from_engine(engine_for(janus_dir), serve_config(janus_dir))
    try:
        conversations = [user(image_part(data_uri(16 + i, 12 + 2 * (i % 7), seed=i)), f"What is in picture {i}?")
                         for i in range(3)]
        outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        assert [o.text for o in outputs] == [bodies[f"see-{i}"]["choices"][0]["message"]["content"] for i in range(3)]
        assert outputs[0].completion_tokens == bodies["see-0"]["usage"]["completion_tokens"]
        pil = Image.open(io.BytesIO(base64.b64decode(data_uri(16, 12, seed=0).split(",")[1])))
        as_pil = llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": pil},
                                                        {"type": "text", "text": "What is in picture 0?"}]}],
                          SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        assert as_pil[0].text == outputs[0].text
        images = llm.generate_images(["a red circle number 1", "a red circle number 3"], seed=None, use_tqdm=False)
        assert len(images) == 2 and images[0][0].size == (8, 8)
        seeded = llm.generate_images("a red circle number 3", seed=3, use_tqdm=False)[0][0]
        batch_png = Image.open(io.BytesIO(base64.b64decode(bodies["draw-3"]["data"][0]["b64_json"])))
        assert seeded.tobytes() == batch_png.convert("RGB").tobytes()
        with pytest.raises(Exception, match="conversation 1: .*--max-images"):
            llm.chat([user("Hi"), user(*[image_part(data_uri(8, 8, seed=s)) for s in range(3)], "Hi")],
                     SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.close()


def test_batch_throughput_reports_rows_per_second_at_each_concurrency(janus_dir):
    figures = batch_throughput(engine_for(janus_dir), rows=4, concurrencies=(1, 4), max_tokens=2, repeats=1)
    assert [(f["mode"], f["concurrency"]) for f in figures] == \
        [("loop of generate", 1), ("vlmkit batch", 1), ("vlmkit batch", 4)]
    assert all(f["rows_per_s"] > 0 and 4 <= f["tokens"] <= 8 for f in figures)


def test_ray_flags_need_ray_mode(tmp_path, capsys):
    source = write_rows(tmp_path / "in.jsonl", [{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}])
    assert main(["batch", "--model", "x", "--input", str(source), "--output", str(tmp_path / "o.jsonl"),
                 "--replicas", "2"]) == 2
    assert "--replicas only apply with --ray" in capsys.readouterr().err


def _batch(tmp_path, source, output) -> int:
    return main(["batch", "--model", str(tmp_path / "no-such-model"), "--input", str(source), "--output", str(output),
                 "--quiet"])


def test_an_output_that_is_the_input_by_any_name_is_refused_and_the_input_kept(tmp_path, capsys, monkeypatch):
    source = write_rows(tmp_path / "in.jsonl", [{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}])
    before = source.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(source)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for output in (source, tmp_path / "link.jsonl", "../in.jsonl"):
        assert _batch(tmp_path, source, output) == 1
        message = capsys.readouterr().err
        assert "is the input file" in message and "in.results.jsonl" in message, message
        assert source.read_bytes() == before


@pytest.mark.parametrize("content", [b"my notes\nmore notes\n", b"notes without a newline",
                                     b"\n", json.dumps({"custom_id": "a", "response": {}}).encode() + b"\nnotes\n"])
def test_an_output_holding_lines_that_are_not_results_is_refused_not_cut(tmp_path, capsys, content):
    source = write_rows(tmp_path / "in.jsonl", [{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}])
    output = tmp_path / "notes.txt"
    output.write_bytes(content)
    assert _batch(tmp_path, source, output) == 1
    message = capsys.readouterr().err
    assert "is not a batch output line" in message and "Give a new --output path, or delete this file" in message
    assert output.read_bytes() == content


@pytest.mark.parametrize("tail", [b'{"id":"batch_req_0f3a","custom_id":"b","resp', b'{"i', b"\0\0\0\0"])
def test_only_a_torn_last_result_line_is_cut(tmp_path, tail):
    whole = json.dumps({"id": "batch_req_1", "custom_id": "a", "response": {}}, separators=(",", ":")).encode() + b"\n"
    (tmp_path / "out.jsonl").write_bytes(whole + tail)
    with ResultsFile(tmp_path / "out.jsonl") as results:
        assert results.open({"a", "b"}) == {"a"}
    assert (tmp_path / "out.jsonl").read_bytes() == whole


def test_output_paths_that_cannot_hold_results_are_refused_naming_output(tmp_path, capsys):
    source = write_rows(tmp_path / "in.jsonl", [{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}])
    for output, why in ((tmp_path, "is a directory"), ("/dev/null", "is not a regular file"),
                        (source / "x.jsonl", "cannot use --output")):
        assert _batch(tmp_path, source, output) == 1
        message = capsys.readouterr().err
        assert message.startswith("vlmkit: error: ") and why in message and "--output" in message, message
    assert _batch(tmp_path, tmp_path, tmp_path / "out.jsonl") == 1
    assert "is a directory; give the batch JSONL file (--input)" in capsys.readouterr().err
    assert _batch(tmp_path, source, "") == 1
    assert "the output path is empty; give a file path for the results (--output)" in capsys.readouterr().err


@pytest.mark.parametrize("source, why", [("/dev/null", "'/dev/null' is not a regular file (a device, pipe or socket)"),
                                         ("", "the input path is empty; give the batch JSONL file (--input)")])
def test_an_input_that_is_not_a_regular_file_is_named_as_such(tmp_path, capsys, source, why):
    assert _batch(tmp_path, source, tmp_path / "out.jsonl") == 1
    message = capsys.readouterr().err
    assert message.startswith("vlmkit: error: ") and why in message and "does not exist" not in message, message
    assert not (tmp_path / "out.jsonl").exists()


def test_lines_too_deep_with_huge_numbers_or_a_lone_surrogate_custom_id_are_refused(tmp_path, capsys):
    lines = ['{"custom_id": "deep", "body": ' + "[" * 100_000 + "]" * 100_000 + "}",
             '{"custom_id": "big", "body": {"seed": ' + "9" * 5000 + "}}",
             '{"custom_id": "\\ud800x", "url": "/v1/chat/completions", "body": {}}',
             '{"custom_id": "fine", "url": "/v1/chat/completions", "body": {}}']
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert _batch(tmp_path, source, tmp_path / "out.jsonl") == 1
    message = capsys.readouterr().err
    assert "3 line(s) cannot be run" in message and "line 1: the JSON is nested too deeply" in message
    assert "line 2: a number has more than 4300 digits" in message
    assert "line 3: custom_id '\\ud800x' is not valid Unicode" in message
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(BatchFileError, match="not valid Unicode"):
        BatchRequest.from_row({"custom_id": "\ud800", "body": {}})
