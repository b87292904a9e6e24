"""The benchmark's batch row: rows per second of a batch job with 1, 4 and 16 rows in flight, against a
loop of single ``generate`` calls (``Engine.chat``), from one run and one loaded model. Rows are
greedy chat requests about an image each, with the same answer budget in every way.

    python -m vlmkit.bench.batch_throughput --model PATH            # any checkpoint
    python -m vlmkit.bench.batch_throughput --size real             # random Janus-Pro-1B shapes (built once)
    python -m vlmkit.bench.batch_throughput --size tiny --rows 16   # seconds; a smoke test"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def throughput_rows(count: int, max_tokens: int = 32, image_size: int = 64, with_images: bool = True,
                    first_seed: int = 0) -> list[dict]:
    """``count`` different greedy chat bodies (a generated image, from ``first_seed`` on, and a question)."""
    from PIL import Image

    bodies = []
    for i in range(count):
        content = [{"type": "text", "text": f"Describe picture number {i} in one sentence."}]
        if with_images:
            pixels = np.random.default_rng(first_seed + i).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        bodies.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0})
    return bodies


def batch_throughput(engine, *, rows: int = 32, concurrencies=(1, 4, 16), max_tokens: int = 32,
                     with_images: bool = True, repeats: int = 3) -> list[dict]:
    """Rows/s of ``vlmkit batch`` at each of ``concurrencies`` and of a loop of ``Engine.chat`` calls, on
    ``engine``. Each way runs once as a warm-up, then ``repeats`` rounds take turns (loop, 1, 4, 16,
    loop, ...) so a busy moment of the machine does not land on one way alone; the median round is
    reported. Every run gets images of its own, so no way profits from features cached by another.
    Returns one dict per way (``mode``, ``concurrency``, ``rows``, ``tokens``, ``seconds``,
    ``rows_per_s``, ``tokens_per_s``, ``speedup`` over the loop)."""
    from ..batch.rows import BatchWorker
    from ..serve.config import ServeConfig

    ways = [("loop of generate", 1)] + [("vlmkit batch", c) for c in concurrencies]
    workers = {c: BatchWorker(engine, ServeConfig(model="benchmark"), c) for c in concurrencies}
    runs: dict[tuple, list] = {way: [] for way in ways}
    seed = 0
    try:
        for round_ in range(repeats + 1):
            for way in ways:
                count = rows if round_ else min(rows, 2)  # round 0: warm-up
                bodies = throughput_rows(count, max_tokens, with_images=with_images, first_seed=seed)
                seed += count
                seconds, tokens = _timed_loop(engine, bodies) if way[0] == "loop of generate" else \
                    _timed_batch(workers[way[1]], bodies)
                if round_:
                    runs[way].append((seconds, tokens))
    finally:
        for worker in workers.values():
            worker.close()
    figures = []
    for (mode, concurrency), measured in runs.items():
        seconds, tokens = sorted(measured)[len(measured) // 2]
        figures.append(dict(mode=mode, concurrency=concurrency, rows=rows, tokens=tokens, seconds=seconds,
                            rows_per_s=rows / seconds, tokens_per_s=tokens / seconds))
    loop = figures[0]["rows_per_s"]
    for figure in figures:
        figure["speedup"] = figure["rows_per_s"] / loop
    return figures


def _timed_loop(engine, bodies: list[dict]) -> tuple[float, int]:
    """One ``Engine.chat`` (one ``generate``) per row, in turn: (seconds, answer tokens)."""
    messages = [_engine_messages(body["messages"]) for body in bodies]
    started = time.perf_counter()
    tokens = sum(engine.chat(m, max_new_tokens=bodies[0]["max_tokens"]).completion_tokens for m in messages)
    return time.perf_counter() - started, tokens


def _timed_batch(worker, bodies: list[dict]) -> tuple[float, int]:
    """The rows through a ``BatchWorker`` (the ``vlmkit batch`` path): (seconds, answer tokens)."""
    from ..batch.rows import BatchRequest

    requests = [BatchRequest(str(i), "POST", "/v1/chat/completions", body) for i, body in enumerate(bodies)]
    started = time.perf_counter()
    results = list(worker.run(requests))
    seconds = time.perf_counter() - started
    failed = [body for _, status, body in results if status != 200]
    if failed:
        raise RuntimeError(f"a benchmark row failed: {failed[0]}")
    return seconds, sum(body["usage"]["completion_tokens"] for _, _, body in results)


def format_throughput(figures: list[dict]) -> str:
    """The figures as a small table."""
    lines = [f"{'mode':<18} {'rows in flight':>14} {'rows':>5} {'rows/s':>8} {'tokens/s':>9} {'vs loop':>8}"]
    for f in figures:
        lines.append(f"{f['mode']:<18} {f['concurrency']:>14} {f['rows']:>5} {f['rows_per_s']:>8.2f} "
                     f"{f['tokens_per_s']:>9.1f} {f['speedup']:>7.2f}x")
    return "\n".join(lines)


def _engine_messages(messages: list[dict]) -> list[dict]:
    """OpenAI content parts as the Engine's (the image as its data URI)."""
    out = []
    for message in messages:
        content = [{"type": "image", "url": part["image_url"]["url"]} if part["type"] == "image_url" else part
                   for part in message["content"]]
        out.append({"role": message["role"], "content": content})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmkit.bench.batch_throughput",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a random Janus checkpoint of --size)")
    parser.add_argument("--size", default="tiny", choices=("tiny", "real"), help="without --model: which Janus")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/vlmkit-bench"),
                        help="where --size checkpoints are built")
    parser.add_argument("--rows", type=int, default=32, help="rows per measurement")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length of each row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="rows in flight")
    parser.add_argument("--text-only", action="store_true", help="rows without an image")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    from ..engine import Engine

    model = args.model
    if model is None:
        from . import transformers_missing
        from .checkpoints import checkpoint
        if transformers_missing():  # the random checkpoint is written by transformers
            print(transformers_missing() + " (or pass --model)", file=sys.stderr)
            return 2
        model = str(checkpoint("janus", args.size, Path(args.cache_dir)))
    engine = Engine.load(model, dtype=args.dtype)
    figures = batch_throughput(engine, rows=args.rows, concurrencies=tuple(args.concurrency),
                               max_tokens=args.max_tokens, with_images=not args.text_only)
    print(f"batch throughput: {model} ({engine.model_type}, {engine.model.dtype}), {args.rows} rows of "
          f"{args.max_tokens} tokens{'' if args.text_only else ' with an image each'}")
    print(format_throughput(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
