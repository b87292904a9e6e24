"""vlmkit against transformers, in one process, on the same inputs: ``vlmkit bench`` or
``python -m vlmkit.bench``.

Builds random-weight checkpoints of the real architectures (or tiny ones), loads both engines, and
times them alternately (A B A B ..., medians): image preprocessing, first token for one image and a
short question, decode steps at batch 1 and 4 (also as a share of the memory-bandwidth bound: the
weight bytes a step reads over the read bandwidth measured just before and after that run), Janus
text-to-image, a repeated image (vision features cached by content), and peak RSS of each engine in a
child process.
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
from collections.abc import Callable
from pathlib import Path

import torch

from ..cli_args import non_negative_int, positive_int
from ..nn.cpu_features import cpu_description
from . import transformers_missing
from .checkpoints import checkpoint
from .families import ENGINES, FAMILIES, QUESTION, REPEAT_QUESTION, TEXT_PROMPTS, test_image
from .measure import (StepTimer, alternate, alternate_with_bandwidth, median, memory_bandwidth_gb_s, pct_of_bound,
                      peak_rss_in_child, peak_rss_mb, timed)
from .options import cache_folder, json_output, llama_cpp_problem, missing_extra
from .quantized import add_llama_cpp_arguments, quantize_variants
from .report import metric, print_table

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def available_families() -> list[str]:
    """Janus always; LLaVA-OneVision once vlmkit has it."""
    names = ["janus"]
    if importlib.util.find_spec("vlmkit.models.llava_onevision") is not None:
        names.append("llava_onevision")
    return names


def bench_family(name: str, args, measure_bandwidth: Callable[[], float], log) -> dict:
    folder = checkpoint(name, args.size, Path(args.cache_dir))
    log(f"[{name}] checkpoint {folder}; loading both engines")
    result = {"checkpoint": str(folder)}
    # both engines live only inside timed_figures: they are freed before the memory probes
    result.update(timed_figures(FAMILIES[name](folder, DTYPES[args.dtype]), args, measure_bandwidth, log))
    gc.collect()
    if not args.skip_rss:
        result["metrics"]["peak_rss_mb"] = peak_rss(name, folder, args)
        log(f"[{name}] memory probes done")
    return result


def timed_figures(family, args, measure_bandwidth: Callable[[], float], log) -> dict:
    """Every timed figure of one family, both engines loaded in ``family``; ``measure_bandwidth()`` runs in
    each round of the figures that are compared with the memory-bandwidth bound."""
    name = family.name
    weight_bytes = family.decode_weight_bytes()
    result = {"decode_weight_bytes": weight_bytes}
    metrics = result["metrics"] = {}
    picture = test_image(0)  # 640x480, one per call
    metrics["preprocess_ms_per_image"] = metric("ms", alternate(
        {e: lambda e=e: timed(lambda: family.preprocess(e, picture)) * 1e3 for e in ENGINES}, max(args.repeats, 5)))
    log(f"[{name}] preprocessing done")
    metrics.update(first_tokens(family, args.first_token_repeats or args.repeats))
    log(f"[{name}] first token done")
    for batch in (1, 4):
        metrics[f"decode_ms_per_step_batch{batch}"] = decode_steps(family, batch, args, weight_bytes, measure_bandwidth)
        log(f"[{name}] decode batch {batch} done")
    result["bandwidth_bound_ms"] = weight_bytes / metrics["decode_ms_per_step_batch1"]["bandwidth_gb_s"] / 1e6
    if name == "janus" and not args.skip_image_generation:
        metrics.update(image_generation(family, args, measure_bandwidth, result))
        log(f"[{name}] text-to-image done")
    return result


def first_tokens(family, repeats: int) -> dict:
    """First token for one image and a question: each round a picture never seen before, then a new
    request (another question) about the same picture, where vlmkit reuses the image's features and the
    keys/values of the prompt prefix that holds it."""
    for engine in ENGINES:  # warm-up on a short text prompt
        family.generate(engine, family.chat_inputs(engine, [], TEXT_PROMPTS[0]), 1)
    first, repeated = {e: [] for e in ENGINES}, {e: [] for e in ENGINES}
    for round_ in range(repeats):
        image = test_image(1000 + round_)
        for engine in ENGINES:
            family.clear_caches()
            for samples, question in ((first, QUESTION), (repeated, REPEAT_QUESTION)):
                inputs = family.chat_inputs(engine, [image], question)
                samples[engine].append(timed(lambda: family.generate(engine, inputs, 1)))
    metrics = {"first_token_s": metric("s", first), "first_token_repeated_image_s": metric("s", repeated)}
    metrics["first_token_repeated_image_s"]["vlmkit_speedup_over_first_image"] = \
        metrics["first_token_s"]["vlmkit"] / metrics["first_token_repeated_image_s"]["vlmkit"]
    return metrics


def decode_steps(family, batch: int, args, weight_bytes: int, measure_bandwidth: Callable[[], float]) -> dict:
    """Milliseconds per decode step (the median time between consecutive new tokens) after short text
    prompts, ``batch`` of them at once; the weights a step reads do not depend on the prompt. Each run is
    bracketed by memory-bandwidth measurements, for the step's share of its bound in that run."""
    inputs = {e: family.chat_inputs(e, [], TEXT_PROMPTS[:batch]) for e in ENGINES}

    def steps(engine):
        timer = StepTimer(skip_first_put=engine == "transformers")
        family.generate(engine, inputs[engine], args.decode_tokens + 1, timer)
        return median(timer.step_seconds()) * 1e3

    samples, bandwidths = alternate_with_bandwidth({e: lambda e=e: steps(e) for e in ENGINES}, measure_bandwidth,
                                                   args.decode_repeats or args.repeats)
    entry = metric("ms", samples)
    entry["bandwidth_gb_s"] = median(bandwidths["vlmkit"])
    entry["bandwidths_gb_s"] = bandwidths
    for engine in ENGINES:
        entry[f"{engine}_tokens_per_s"] = batch * 1e3 / entry[engine]
        entry[f"{engine}_pct_of_bandwidth_bound"] = pct_of_bound(weight_bytes, bandwidths[engine],
                                                                 [ms / 1e3 for ms in samples[engine]])
    return entry


def image_generation(family, args, measure_bandwidth: Callable[[], float], result: dict) -> dict:
    """Janus text-to-image, one image: the CFG image-token loop (the prompt's prefill once, then ``--steps``
    of its tokens, the rest at their mean step time) and the VQ decoder (on a ``--vq-grid`` square of
    tokens, scaled by pixel count: the decoder is convolutional), and their sum."""
    total = family.num_image_tokens()
    steps = max(2, min(args.steps, total))
    for engine in ENGINES:  # warm-up: a couple of steps and a one-token VQ decode
        family.image_token_times(engine, 2)
        family.decode_image(engine, 1)
    loop, bandwidths = alternate_with_bandwidth({e: lambda e=e: family.image_loop_seconds(e, steps) for e in ENGINES},
                                                measure_bandwidth, args.repeats, warmup=0)
    loop_entry = metric("s", loop)
    step_bytes = result["image_step_weight_bytes"] = family.image_step_weight_bytes()
    bandwidth = median(bandwidths["vlmkit"])
    loop_entry.update(steps_run=steps, steps_per_image=total, bandwidth_gb_s=bandwidth, bandwidths_gb_s=bandwidths,
                      bandwidth_bound_s=total * step_bytes / bandwidth / 1e9)
    for engine in ENGINES:
        loop_entry[f"{engine}_pct_of_bandwidth_bound"] = pct_of_bound(total * step_bytes, bandwidths[engine],
                                                                      loop[engine])

    side = round(total ** 0.5)
    grid = min(args.vq_grid or side, side)
    vq = alternate({e: lambda e=e: timed(lambda: family.decode_image(e, grid)) * (side / grid) ** 2
                    for e in ENGINES}, args.repeats, warmup=0)
    vq_entry = metric("s", vq)
    vq_entry["grid_decoded"] = f"{grid}x{grid} of {side}x{side} tokens" + (", scaled" if grid != side else "")
    if grid != side:
        vq_entry["vlmkit_full_grid_s"] = timed(lambda: family.decode_image("vlmkit", side))
    total_entry = metric("s", {e: [t + vq_entry[e] for t in loop[e]] for e in ENGINES})
    figures = {"image_token_loop_s": loop_entry, "vq_decode_s": vq_entry, "text_to_image_s_per_image": total_entry}
    for n in args.images_at_once:  # throughput: n pictures of one prompt drawn together, VQ-decoded one by one
        batch = alternate({e: lambda e=e: family.image_loop_seconds(e, steps, images=n) for e in ENGINES},
                          args.repeats, warmup=0)
        per_minute = {e: [60 * n / (t + n * vq_entry[e]) for t in batch[e]] for e in ENGINES}
        entry = metric("images/min", per_minute)
        entry["ratio"] = entry["transformers"] / entry["vlmkit"]  # as for times: below 1, vlmkit is faster
        figures[f"images_per_minute_n{n}"] = entry
    return figures


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
    parser.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds per engine and figure (medians)")
    parser.add_argument("--first-token-repeats", type=positive_int, help="rounds of the first-token figures (default: "
                        "--repeats; transformers' bf16 prefill of an image prompt takes minutes on some CPUs)")
    parser.add_argument("--decode-repeats", type=positive_int, help="rounds of the decode-step figures (default: "
                        "--repeats; more rounds steady the medians on a shared machine)")
    parser.add_argument("--quantize", type=quantize_variants, help="also time decode with quantized weights on the Janus checkpoint: "
                        "int8, int4, bnb, bnb8 or all (comma-separated), beside transformers and vlmkit in bf16")
    parser.add_argument("--decode-tokens", type=positive_int, default=32, help="decode steps timed per generate call")
    parser.add_argument("--steps", type=positive_int, default=576, help="image-token steps run per text-to-image: the "
                        "prompt's prefill once, then the rest of the image's tokens at the mean step time of these "
                        "(576 = all, measured whole)")
    parser.add_argument("--vq-grid", type=non_negative_int, default=4,
                        help="VQ-decode an NxN square of image tokens and scale by pixel count (0 = the whole "
                             "image; transformers' bf16 convolutions need about 10 minutes for a whole image on "
                             "AVX2); vlmkit's whole-image decode is measured as well")
    parser.add_argument("--cache-dir", type=cache_folder, default=os.path.expanduser("~/.cache/vlmkit-bench"),
                        help="where the random-weight checkpoints are built and kept")
    parser.add_argument("--json", type=json_output, help="also write every figure to this JSON file")
    add_llama_cpp_arguments(parser)  # llama.cpp's rows in the --quantize table
    parser.add_argument("--skip-rss", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--skip-image-generation", action="store_true", help="skip Janus text-to-image")
    parser.add_argument("--constrained", action="store_true",
                        help="also time a Janus decode step under a JSON Schema grammar against one without")
    parser.add_argument("--images-at-once", default=[],
                        type=lambda text: [positive_int(n) for n in text.split(",") if n],
                        help="also time text-to-image throughput with this many pictures drawn together "
                             "(comma-separated, e.g. 4,8), in images per minute")
    parser.add_argument("--probe-rss", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_rss:
        probe_rss(args)
        return 0
    missing = transformers_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    names = args.family or available_families()
    missing = [n for n in names if n not in available_families()]
    if missing:
        print(f"vlmkit bench: vlmkit has no {', '.join(missing)} yet", file=sys.stderr)
        return 2
    problem = _missing_extra(args) or llama_cpp_problem(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2

    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    gib = 0.25 if args.size == "tiny" else 1.0
    bandwidth = memory_bandwidth_gb_s(gib)
    log(f"memory-read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads)")
    report = {"settings": settings(args), "memory_bandwidth_gb_s": bandwidth, "families": {}}
    for name in names:
        report["families"][name] = bench_family(name, args, lambda: memory_bandwidth_gb_s(gib, repeats=5), log)
    print_table(report)
    if args.constrained and "janus" in names:  # the server's grammar-constrained step, vlmkit only
        from .constrained import constrained_decode_row
        from .constrained import table_lines as constrained_lines
        log("[constrained] decode steps with and without a JSON Schema grammar")
        folder = checkpoint("janus", args.size, Path(args.cache_dir))
        model = FAMILIES["janus"](folder, DTYPES[args.dtype], engines=("vlmkit",)).models["vlmkit"]
        row = report["constrained_janus"] = constrained_decode_row(model, folder, args.decode_tokens)
        del model
        print(f"\njanus ({args.size} size), constrained decoding:\n" + "\n".join(constrained_lines(row)))
    if args.quantize:  # decode with quantized weights, on the Janus checkpoint, each variant in a child
        from .quantized import quantized_decode_rows, table_lines
        # each variant's image-token step too (its own CFG loop, the first steps of an image), unless skipped
        image_steps = 0 if args.skip_image_generation else min(args.steps, 48)
        rows = quantized_decode_rows(checkpoint("janus", args.size, Path(args.cache_dir)),
                                     argparse.Namespace(**{**vars(args), "image_steps": image_steps}), log)
        report["quantized_janus"] = rows
        print("\njanus (" + args.size + " size), quantized weights:\n" + "\n".join(table_lines(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _missing_extra(args) -> str | None:
    """What an asked-for figure needs that is not installed (checked before the first measurement)."""
    from .quantized import VARIANTS, variants_for
    bnb = args.quantize and any(VARIANTS.get(name, ("", None))[1] in ("bnb4", "bnb8")
                                for name in variants_for(args.quantize))
    return (bnb and missing_extra(["bitsandbytes", "accelerate"], "--quantize bnb, bnb8 or all")) \
        or (args.constrained and missing_extra(["llguidance"], "--constrained")) or None


def settings(args) -> dict:
    import transformers

    import vlmkit
    cpu = cpu_description()
    return {"size": args.size, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats,
            "decode_tokens": args.decode_tokens, "image_steps": args.steps, "torch": torch.__version__,
            "transformers": transformers.__version__, "vlmkit": vlmkit.__version__, "cpu": cpu,
            "kernels": cpu["kernels"], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
