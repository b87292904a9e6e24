"""The batch throughput row: rows/s of `vlmkit batch` with 1, 4 and 16 rows in flight against a loop of
single `generate` calls, from one run on one loaded model (`vlmkit.batch.throughput.batch_throughput`).

    python benchmarks/batch_throughput.py --model PATH            # any checkpoint
    python benchmarks/batch_throughput.py --size real             # random Janus-Pro-1B shapes (built once)
    python benchmarks/batch_throughput.py --size tiny --rows 16   # seconds; a smoke test"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `vlmkit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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

    from vlmkit.batch.throughput import batch_throughput, format_throughput
    from vlmkit.engine import Engine

    model = args.model
    if model is None:
        from benchmarks.checkpoints import checkpoint
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
