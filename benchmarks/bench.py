"""vlmkit against transformers, in one process, on the same inputs: ``python -m benchmarks.bench`` or
``vlmkit bench``.

Builds random-weight checkpoints of the real architectures (or tiny ones), loads both engines, and
times them alternately (A B A B ..., medians): image preprocessing, first token for one image and a
short question, decode steps at batch 1 and 4 (also as a share of the memory-bandwidth bound: the
weight bytes a step reads over the read bandwidth measured here), Janus text-to-image, a repeated
image (vision features cached by content), and peak RSS of each engine in a child process.
Prints a table; ``--json`` writes every figure."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.checkpoints import checkpoint
from benchmarks.families import ENGINES, FAMILIES, test_image
from benchmarks.measure import (StepTimer, alternate, median, memory_bandwidth_gb_s, peak_rss_in_child, peak_rss_mb,
                                timed)
from benchmarks.report import metric, print_table

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def available_families() -> list[str]:
    """Janus always; LLaVA-OneVision once vlmkit has it."""
    names = ["janus"]
    if importlib.util.find_spec("vlmkit.models.llava_onevision") is not None:
        names.append("llava_onevision")
    return names


def bench_family(name: str, args, bandwidth: float, log) -> dict:
    dtype = DTYPES[args.dtype]
    folder = checkpoint(name, args.size, Path(args.cache_dir))
    log(f"[{name}] checkpoint {folder}; loading both engines")
    family = FAMILIES[name](folder, dtype)
    repeats, images = args.repeats, iter(range(1, 1_000_000))
    metrics, result = {}, {"checkpoint": str(folder)}

    # image preprocessing, one 640x480 picture per call
    picture = test_image(0)
    samples = alternate({e: lambda e=e: timed(lambda: family.preprocess(e, picture)) * 1e3 for e in ENGINES},
                        max(repeats, 5))
    metrics["preprocess_ms_per_image"] = metric("ms", samples)
    log(f"[{name}] preprocessing done")

    # first token: a new image every time (nothing cached anywhere), then the same image once more
    def first_token(engine, image):
        inputs = family.chat_inputs(engine, [image])
        return timed(lambda: family.generate(engine, inputs, 1))

    def fresh(engine):
        family.clear_vision_cache()
        return first_token(engine, test_image(next(images)))

    metrics["first_token_s"] = metric("s", alternate({e: lambda e=e: fresh(e) for e in ENGINES}, repeats))
    repeated = {e: [] for e in ENGINES}
    for _ in range(repeats):
        image = test_image(next(images))
        for engine in ENGINES:
            first_token(engine, image)
            repeated[engine].append(first_token(engine, image))
    metrics["first_token_repeated_image_s"] = metric("s", repeated)
    metrics["first_token_repeated_image_s"]["vlmkit_speedup_over_first_image"] = \
        metrics["first_token_s"]["vlmkit"] / metrics["first_token_repeated_image_s"]["vlmkit"]
    log(f"[{name}] first token done")

    # decode steps, batch 1 and 4: the median time between consecutive new tokens
    weight_bytes = family.decode_weight_bytes()
    bound_ms = weight_bytes / bandwidth / 1e6
    result.update(decode_weight_bytes=weight_bytes, bandwidth_bound_ms=bound_ms)
    for batch in (1, 4):
        inputs = {e: family.chat_inputs(e, [test_image(100 + i) for i in range(batch)]) for e in ENGINES}

        def steps(engine):
            timer = StepTimer(skip_first_put=engine == "transformers")
            family.generate(engine, inputs[engine], args.decode_tokens + 1, timer)
            return median(timer.step_seconds()) * 1e3

        entry = metric("ms", alternate({e: lambda e=e: steps(e) for e in ENGINES}, repeats))
        for engine in ENGINES:
            entry[f"{engine}_tokens_per_s"] = batch * 1e3 / entry[engine]
            entry[f"{engine}_pct_of_bandwidth_bound"] = 100 * bound_ms / entry[engine]
        metrics[f"decode_ms_per_step_batch{batch}"] = entry
        log(f"[{name}] decode batch {batch} done")

    if name == "janus" and not args.skip_image_generation:
        metrics["text_to_image_s_per_image"] = text_to_image(family, args, bandwidth, result)
        log(f"[{name}] text-to-image done")

    del family
    gc.collect()
    if not args.skip_rss:
        metrics["peak_rss_mb"] = peak_rss(name, folder, args)
        log(f"[{name}] memory probes done")
    result["metrics"] = metrics
    return result


def text_to_image(family, args, bandwidth: float, result: dict) -> dict:
    """Seconds per image: the CFG image-token loop (``--steps`` of the image's tokens, scaled to all of
    them) plus the VQ decoder turning the tokens into pixels."""
    total = family.num_image_tokens()
    steps = min(args.steps, total)
    loop = alternate({e: lambda e=e: timed(lambda: family.text_to_image_tokens(e, steps)) for e in ENGINES},
                     args.repeats)
    tokens = torch.randint(0, family.models["vlmkit"].config.vq_config.num_embeddings, (1, total))
    decode = alternate({e: lambda e=e: timed(lambda: family.decode_image(e, tokens)) for e in ENGINES},
                       args.repeats)
    samples = {e: [t * total / steps + median(decode[e]) for t in loop[e]] for e in ENGINES}
    entry = metric("s", samples)
    entry.update(steps_run=steps, steps_per_image=total, vq_decode_s={e: median(decode[e]) for e in ENGINES})
    step_bytes = family.image_step_weight_bytes()
    result["image_step_weight_bytes"] = step_bytes
    bound_s = total * step_bytes / bandwidth / 1e9
    for engine in ENGINES:
        entry[f"{engine}_pct_of_bandwidth_bound"] = 100 * bound_s / (entry[engine] - entry["vq_decode_s"][engine])
    return entry


def peak_rss(name: str, folder: Path, args) -> dict:
    """Each engine alone in a child process: load, answer one image question, decode 8 tokens."""
    samples = {}
    for engine in ENGINES:
        probe = peak_rss_in_child(["--probe-rss", engine, "--family", name, "--checkpoint", str(folder),
                                   "--dtype", args.dtype, "--threads", str(args.threads)])
        samples[engine] = [probe["peak_rss_mb"]]
    entry = metric("MiB", samples)
    entry["how"] = "peak RSS (VmHWM) of a child process per engine that loads the model and processor and generates " \
                   "9 tokens for one image and a question (includes Python, torch and the weights)"
    return entry


def probe_rss(args) -> None:
    """The child of ``peak_rss``: prints {"peak_rss_mb": ...} as its last line."""
    torch.set_num_threads(args.threads)
    family = FAMILIES[args.family[0]](Path(args.checkpoint), DTYPES[args.dtype], engines=(args.probe_rss,))
    family.generate(args.probe_rss, family.chat_inputs(args.probe_rss, [test_image(1)]), 9)
    print(json.dumps({"engine": args.probe_rss, "peak_rss_mb": peak_rss_mb()}))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="vlmkit bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "real"], default="real",
                        help="tiny: seconds, for smoke tests; real: Janus-Pro-1B / LLaVA-OneVision-0.5B shapes")
    parser.add_argument("--family", action="append", choices=list(FAMILIES),
                        help="family to run (repeatable; default: every one vlmkit has)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per engine and figure (medians)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed per generate call")
    parser.add_argument("--steps", type=int, default=576, help="image-token steps run per text-to-image "
                                                               "(scaled to the full image; 576 = all)")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/vlmkit-bench"),
                        help="where the random-weight checkpoints are built and kept")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--skip-rss", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--skip-image-generation", action="store_true", help="skip Janus text-to-image")
    parser.add_argument("--probe-rss", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_rss:
        probe_rss(args)
        return 0
    torch.set_num_threads(args.threads)
    names = args.family or available_families()
    missing = [n for n in names if n not in available_families()]
    if missing:
        print(f"vlmkit bench: vlmkit has no {', '.join(missing)} yet", file=sys.stderr)
        return 2

    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    bandwidth = memory_bandwidth_gb_s(gib=0.25 if args.size == "tiny" else 1.0)
    log(f"memory-read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads)")
    report = {"settings": settings(args), "memory_bandwidth_gb_s": bandwidth, "families": {}}
    for name in names:
        report["families"][name] = bench_family(name, args, bandwidth, log)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def settings(args) -> dict:
    import transformers

    import vlmkit
    from vlmkit.nn.cpu_kernels import decode_kernels
    return {"size": args.size, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats,
            "decode_tokens": args.decode_tokens, "image_steps": args.steps, "torch": torch.__version__,
            "transformers": transformers.__version__, "vlmkit": vlmkit.__version__, "cpu": _cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "bf16_decode_kernel": DTYPES[args.dtype] == torch.bfloat16 and decode_kernels() is not None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
