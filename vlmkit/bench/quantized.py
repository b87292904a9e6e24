"""Decode speed and memory with quantized weights, on a Janus checkpoint: transformers bf16, vlmkit in
bf16, int8 and int4, llama.cpp BF16 and Q8_0 where a llama.cpp build is found (llama_cpp.py), and, asked
for, the BitsAndBytesConfig path of both engines.

Every variant runs alone in a child process (``python -m vlmkit.bench.quantized --child ...``), so its
peak RSS is its own: the child loads the model and processor, answers one image question (9 tokens,
as run.py's memory probe), then times decode steps at batch 1 after a short text prompt (the median
time between consecutive new tokens, median over ``repeats`` runs). vlmkit's variants are then timed
once more all in one child, their decode rounds alternating (bf16, int8, int4, bf16, ...): the share of
vlmkit's bf16 step each takes comes from those rounds, as a shared machine's memory bandwidth moves within
minutes (one child after the other, the same int8 step came out at 0.47x and 0.71x of bf16).
``quantized_decode_rows`` is what ``vlmkit bench --quantize`` calls; ``python -m vlmkit.bench.quantized``
runs it alone and prints a table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..cli_args import non_negative_int, positive_int
from ..nn.cpu_features import cpu_description
from . import transformers_missing
from .llama_cpp import VARIANTS as LLAMA_CPP_VARIANTS
from .llama_cpp import llama_cpp_rows
from .options import cache_folder, json_output
from .report import cpu_line

# variant name -> (engine, quantization): None, "int8"/"int4" (vlmkit's own) or "bnb4"/"bnb8" (bitsandbytes)
VARIANTS = {
    "transformers bf16": ("transformers", None),
    "vlmkit bf16": ("vlmkit", None),
    "vlmkit int8": ("vlmkit", "int8"),
    "vlmkit int4": ("vlmkit", "int4"),
    "transformers bnb nf4": ("transformers", "bnb4"),
    "vlmkit bnb nf4": ("vlmkit", "bnb4"),
    "transformers bnb int8": ("transformers", "bnb8"),
    "vlmkit bnb int8": ("vlmkit", "bnb8"),
}
DEFAULT_VARIANTS = ("transformers bf16", "vlmkit bf16", "vlmkit int8", "vlmkit int4")
ALL_VARIANTS = (*VARIANTS, *LLAMA_CPP_VARIANTS)


def variants_for(quantize: str | None) -> list[str]:
    """The variants a ``--quantize`` value asks for: "int8", "int4", "bnb" (both engines' nf4), "all", or a
    comma-separated mix; transformers bf16 and vlmkit bf16 always come first, as the baselines, and
    llama.cpp's rows last (skipped where no llama.cpp build is found)."""
    names = list(DEFAULT_VARIANTS[:2])
    for part in (quantize or "int8,int4").split(","):
        part = part.strip()
        chosen = {"int8": ["vlmkit int8"], "int4": ["vlmkit int4"], "all": list(VARIANTS),
                  "bnb": ["transformers bnb nf4", "vlmkit bnb nf4"],
                  "bnb8": ["transformers bnb int8", "vlmkit bnb int8"]}.get(part)
        if chosen is None:
            raise ValueError(f"--quantize {part!r}: use int8, int4, bnb, bnb8 or all (comma-separated)")
        names += [n for n in chosen if n not in names]
    return names + list(LLAMA_CPP_VARIANTS)


def quantize_variants(text: str) -> str:
    """``--quantize`` as argparse reads it: int8, int4, bnb, bnb8 or all, comma-separated (``variants_for``)."""
    try:
        variants_for(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--quantize ")) from None
    return text


def quantized_decode_rows(folder, args, log, variants=None) -> dict:
    """{variant: {decode_ms_per_step, tokens_per_s, peak_rss_mb, load_s}} for each variant (default:
    ``variants_for(args.quantize)``), each measured in its own child process, plus each one's decode
    time and peak memory as a share of "transformers bf16" and "vlmkit bf16" where those ran. ``args``
    needs ``threads``, ``repeats``, ``decode_tokens``; ``quantize`` is optional."""
    rows = {}
    names = variants or variants_for(getattr(args, "quantize", None))
    for name in names:
        if name in VARIANTS:
            log(f"[quantized] {name}")
            rows[name] = _run_child(folder, name, args)
    if any(name in LLAMA_CPP_VARIANTS for name in names):
        rows.update({name: row for name, row in llama_cpp_rows(Path(folder), args, log).items() if name in names})
    for baseline in ("transformers bf16", "vlmkit bf16"):
        if baseline in rows:
            for row in rows.values():
                row[f"decode_vs_{baseline.replace(' ', '_')}"] = \
                    row["decode_ms_per_step"] / rows[baseline]["decode_ms_per_step"]
                row[f"peak_rss_vs_{baseline.replace(' ', '_')}"] = row["peak_rss_mb"] / rows[baseline]["peak_rss_mb"]
    together = [name for name in rows if VARIANTS.get(name, ("",))[0] == "vlmkit"]
    if "vlmkit bf16" in together and len(together) > 1:
        log(f"[quantized] {', '.join(together)}, alternating in one process")
        alternating = _run_child(folder, ",".join(together), args, "--alternate")
        for name in together:
            rows[name]["decode_alternating_ms"] = alternating[name]
            rows[name]["decode_vs_vlmkit_bf16"] = alternating[name] / alternating["vlmkit bf16"]
    if "image_step_ms" in rows.get("transformers bf16", {}):
        for row in rows.values():
            if "image_step_ms" in row:
                row["image_step_vs_transformers_bf16"] = row["image_step_ms"] / rows["transformers bf16"]["image_step_ms"]
    return rows


def table_lines(rows: dict) -> list[str]:
    images = any("image_step_ms" in row for row in rows.values())
    image_head = " image step ms (CFG, 2 rows) | vs transformers bf16 | vs own decode step |" if images else ""
    lines = ["| variant | decode ms/step (batch 1) | vs transformers bf16 | vs vlmkit bf16 (rounds alternating) | "
             "peak RSS MiB | "
             "vs vlmkit bf16 | load s |" + image_head, "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * 3 * images]
    for name, row in rows.items():
        shares = [f"{row[key]:.2f}" if key in row else "-" for key in
                  ("decode_vs_transformers_bf16", "decode_vs_vlmkit_bf16", "peak_rss_vs_vlmkit_bf16")]
        load = f"{row['load_s']:.1f}" if "load_s" in row else "-"
        line = (f"| {name} | {row['decode_ms_per_step']:.1f} | {shares[0]} | {shares[1]} | "
                f"{row['peak_rss_mb']:.0f} | {shares[2]} | {load} |")
        if images:
            image = [f"{row[key]:{spec}}" if key in row else "-" for key, spec in
                     (("image_step_ms", ".1f"), ("image_step_vs_transformers_bf16", ".2f"),
                      ("image_step_vs_decode_step", ".2f"))]
            line += f" {image[0]} | {image[1]} | {image[2]} |"
        lines.append(line)
    return lines


def add_llama_cpp_arguments(parser) -> None:
    parser.add_argument("--llama-cpp", metavar="DIR", help="a llama.cpp source tree with build/bin/llama-bench "
                        "(default: $VLMKIT_LLAMA_CPP, or the one --build-llama-cpp left in --cache-dir)")
    parser.add_argument("--build-llama-cpp", action="store_true", help="fetch the llama-cpp-python sdist and "
                        "build llama-bench into --cache-dir first (once; tens of minutes on 2 cores)")


def _run_child(folder, name: str, args, role: str = "--child") -> dict:
    argv = [sys.executable, "-m", "vlmkit.bench.quantized", role, name, "--checkpoint", str(folder),
            "--threads", str(args.threads), "--repeats", str(args.repeats), "--decode-tokens", str(args.decode_tokens),
            "--image-steps", str(args.image_steps)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=getattr(args, "child_timeout", 3600))
    if result.returncode != 0:
        raise RuntimeError(f"quantized benchmark child {name!r} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _load(name: str, folder: Path):
    """The benchmark family (families.Janus) with one engine, loaded as the variant says."""
    from .families import Janus, quiet_transformers

    engine, quantization = VARIANTS[name]

    class QuantizedJanus(Janus):
        def load(self, engine):
            if quantization is None:
                return super().load(engine)
            if engine == "vlmkit":
                import vlmkit
                config = quantization if quantization in ("int8", "int4") else vlmkit.BitsAndBytesConfig(**_bnb(quantization))
                return (vlmkit.JanusForConditionalGeneration.from_pretrained(self.folder, dtype=self.dtype,
                                                                            quantization_config=config),
                        vlmkit.JanusProcessor.from_pretrained(self.folder))
            transformers = quiet_transformers()
            model = transformers.JanusForConditionalGeneration.from_pretrained(
                self.folder, dtype=self.dtype, device_map="cpu",
                quantization_config=transformers.BitsAndBytesConfig(**_bnb(quantization)))
            return model.eval(), transformers.JanusProcessor.from_pretrained(self.folder, backend="pil")

    return QuantizedJanus(folder, torch.bfloat16, engines=(engine,)), engine


def _bnb(quantization: str) -> dict:
    if quantization == "bnb8":
        return dict(load_in_8bit=True)
    return dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def child(args) -> None:
    """One variant: load, answer one image question, time decode steps; prints its row as JSON."""
    from .families import TEXT_PROMPTS, test_image
    from .measure import median, peak_rss_mb

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    family, engine = _load(args.child, Path(args.checkpoint))
    load_s = time.perf_counter() - started
    family.generate(engine, family.chat_inputs(engine, [test_image(1)]), 9)
    inputs = family.chat_inputs(engine, [], TEXT_PROMPTS[:1])
    steps = [_decode_round_ms(family, engine, inputs, args.decode_tokens) for _ in range(args.repeats)]
    decode_ms = median(steps)
    row = {"variant": args.child, "decode_ms_per_step": decode_ms, "tokens_per_s": 1e3 / decode_ms,
           "decode_samples_ms": steps, "peak_rss_mb": peak_rss_mb(), "load_s": load_s}
    if args.image_steps:
        # text-to-image: the median CFG step (two rows) of the first image_steps tokens, per repeat
        image = [median(family.image_token_times(engine, args.image_steps + 1)[1]) * 1e3 for _ in range(args.repeats)]
        row.update(image_step_ms=median(image), image_step_samples_ms=image,
                   image_step_vs_decode_step=median(image) / decode_ms)
    print(json.dumps(row))


def _decode_round_ms(family, engine: str, inputs, tokens: int) -> float:
    """One generate call of ``tokens`` decode steps at batch 1: the median time between new tokens, in ms."""
    from .measure import StepTimer, median

    timer = StepTimer(skip_first_put=engine == "transformers")
    family.generate(engine, inputs, tokens + 1, timer)
    return median(timer.step_seconds()) * 1e3


def alternating_child(args) -> None:
    """vlmkit's variants in ``args.alternate`` loaded side by side, their decode rounds alternating (one
    warm-up round each); prints {variant: median ms per step} as JSON."""
    from .families import TEXT_PROMPTS
    from .measure import alternate, median

    torch.set_num_threads(args.threads)
    loaded = {name: _load(name, Path(args.checkpoint)) for name in args.alternate.split(",")}
    inputs = {name: family.chat_inputs(engine, [], TEXT_PROMPTS[:1]) for name, (family, engine) in loaded.items()}
    rounds = alternate({name: lambda name=name: _decode_round_ms(*loaded[name], inputs[name], args.decode_tokens)
                        for name in loaded}, args.repeats)
    print(json.dumps({name: median(samples) for name, samples in rounds.items()}))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vlmkit.bench.quantized", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "real"], default="real")
    parser.add_argument("--quantize", type=quantize_variants,
                        help="variants beside the bf16 baselines: int8, int4, bnb, bnb8, all (comma-separated; "
                             "default int8,int4)")
    parser.add_argument("--variants", help="exactly these variants, comma-separated ("
                                           + ", ".join(ALL_VARIANTS) + ")")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--decode-tokens", type=positive_int, default=16)
    parser.add_argument("--image-steps", type=non_negative_int, default=24, help="image-token steps timed per variant (Janus "
                        "text-to-image, CFG; 0: none)")
    parser.add_argument("--cache-dir", type=cache_folder, default=os.path.expanduser("~/.cache/vlmkit-bench"))
    parser.add_argument("--json", type=json_output, help="also write the settings (CPU included) and the rows to this JSON file")
    add_llama_cpp_arguments(parser)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--alternate", help=argparse.SUPPRESS)  # vlmkit variants, comma-separated
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.alternate:
        alternating_child(args)
        return 0
    if args.child:
        child(args)
        return 0
    missing = transformers_missing()  # it writes the checkpoint, and runs the "transformers" variants
    if missing:
        print(missing, file=sys.stderr)
        return 2
    from .checkpoints import checkpoint
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    folder = checkpoint("janus", args.size, Path(args.cache_dir))
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    unknown = [v for v in variants or [] if v not in ALL_VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {list(ALL_VARIANTS)}", file=sys.stderr)
        return 2
    rows = quantized_decode_rows(folder, args, log, variants)
    cpu = cpu_description()
    print("\n".join([cpu_line(cpu), f"janus ({args.size} size), {args.threads} threads, quantized weights:",
                     *table_lines(rows)]))
    if args.json:
        settings = {"size": args.size, "threads": args.threads, "repeats": args.repeats,
                    "decode_tokens": args.decode_tokens, "torch": torch.__version__, "cpu": cpu,
                    "kernels": cpu["kernels"]}
        Path(args.json).write_text(json.dumps({"settings": settings, "variants": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
