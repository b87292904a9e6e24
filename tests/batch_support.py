"""Helpers for the batch-job tests: a 104-row OpenAI batch file for the tiny Janus checkpoint (chat
about images, text chat greedy and sampled, image generation, and bad rows of every kind), the
settings both the in-process and the command-line runs use, and results keyed by custom_id with
what differs between runs of the same rows (ids, timestamps) taken out."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from serve_support import data_uri, engine_for, image_part, user

from vlmkit.batch.local import run_batch
from vlmkit.batch.rows import BatchWorker
from vlmkit.serve.config import ServeConfig, ServeLimits

LIMITS = dict(max_images=2, max_n=2, max_body_bytes=60_000)
CONCURRENCY = 16

# custom_id prefix -> expected status of those rows
STATUSES = {"see": 200, "greedy": 200, "seeded": 200, "sampled": 200, "draw": 200,
            "bad-no-messages": 400, "bad-image": 400, "bad-context": 400, "bad-n": 400, "bad-url": 404,
            "bad-method": 405, "bad-too-many-images": 400, "bad-size": 400, "bad-body": 400,
            "bad-local-path": 400, "bad-too-large": 413, "bad-model": 404}


def chat(custom_id: str, body: dict, url: str = "/v1/chat/completions", method: str = "POST") -> dict:
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def batch_rows() -> list[dict]:
    """The test file's rows, interleaved so every kind shares batches with every other."""
    groups = [
        [chat(f"see-{i}", {"messages": user(image_part(data_uri(16 + i, 12 + 2 * (i % 7), seed=i)),
                                            f"What is in picture {i}?"), "max_tokens": 3, "temperature": 0})
         for i in range(40)],
        [chat(f"greedy-{i}", {"messages": user(f"Count to {i}."), "max_tokens": 4, "temperature": 0})
         for i in range(16)],
        [chat(f"seeded-{i}", {"messages": user(f"Tell me about {i}."), "max_tokens": 4, "temperature": 1.0,
                              "seed": 1000 + i}) for i in range(10)],
        # no seed and OpenAI's default temperature 1: sampled, with the seed derived from the custom_id
        [chat(f"sampled-{i}", {"messages": user(f"Guess a word {i}."), "max_tokens": 4, "top_k": 20})
         for i in range(14)],
        [chat(f"draw-{i}", {"prompt": f"a red circle number {i}", "seed": i if i % 2 else None},
              url="/v1/images/generations") for i in range(12)],
    ]
    bad = [
        chat("bad-no-messages", {"max_tokens": 3}),
        chat("bad-image", {"messages": user(image_part("data:image/png;base64," +
                                                       base64.b64encode(b"not a png at all").decode()), "Hi")}),
        chat("bad-context", {"messages": user("Hi"), "max_tokens": 100_000}),
        chat("bad-n", {"messages": user("Hi"), "n": 5, "max_tokens": 2}),
        chat("bad-url", {"input": "hello"}, url="/v1/embeddings"),
        chat("bad-method", {"messages": user("Hi")}, method="GET"),
        chat("bad-too-many-images", {"messages": user(*[image_part(data_uri(8, 8, seed=s)) for s in range(3)], "Hi")}),
        chat("bad-size", {"prompt": "a cat", "size": "1024x1024"}, url="/v1/images/generations"),
        chat("bad-body", ["not", "an", "object"]),
        chat("bad-local-path", {"messages": user(image_part("/etc/hostname"), "Hi")}),
        chat("bad-too-large", {"messages": user(image_part(data_uri(200, 200, seed=9)), "Hi")}),
        chat("bad-model", {"model": "gpt-4o", "messages": user("Hi"), "max_tokens": 2}),
    ]
    rows = []
    longest = max(len(group) for group in groups)
    for i in range(longest):
        rows += [group[i] for group in groups if i < len(group)]
        if i < len(bad):
            rows.append(bad[i])
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def serve_config(model_dir) -> ServeConfig:
    return ServeConfig(model=str(model_dir), limits=ServeLimits(**LIMITS))


def cli_flags() -> list[str]:
    """The same settings as ``serve_config`` as ``vlmkit batch`` flags."""
    return ["--max-images", str(LIMITS["max_images"]), "--max-n", str(LIMITS["max_n"]),
            "--max-body-bytes", str(LIMITS["max_body_bytes"]), "--concurrency", str(CONCURRENCY)]


def run_in_process(model_dir, input_path: Path, output_path: Path, concurrency: int = CONCURRENCY,
                   stats: dict | None = None, **config):
    """``run_batch`` on the session's loaded engine (no model load); ``stats`` receives the scheduler's."""
    settings = serve_config(model_dir)
    for key, value in config.items():
        setattr(settings, key, value)
    with BatchWorker(engine_for(model_dir), settings, concurrency) as worker:
        report = run_batch(settings, input_path, output_path, worker=worker, progress=False)
        if stats is not None:
            stats.update(worker.scheduler.stats())
    return report


def read_output(path: Path) -> list[dict]:
    """Every line of an output file, parsed (fails on a torn or non-JSON line)."""
    data = Path(path).read_bytes()
    assert not data or data.endswith(b"\n"), "the output ends in a torn line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def comparable(lines: list[dict]) -> dict[str, tuple]:
    """custom_id -> (status, body without its id and timestamp); fails on a custom_id written twice."""
    results = {}
    for line in lines:
        assert line["custom_id"] not in results, f"{line['custom_id']} written twice"
        body = dict(line["response"]["body"])
        body.pop("id", None)
        body.pop("created", None)
        results[line["custom_id"]] = (line["response"]["status_code"], body)
    return results


def kind(custom_id: str) -> str:
    return custom_id if custom_id.startswith("bad-") else custom_id.rsplit("-", 1)[0]
