"""Evaluate a shapes-world checkpoint (default: the built-in model) on held-out scenes.

* understanding: exact-match accuracy per question type on scenes from a seed namespace the training
  never uses ("eval:<seed>"), greedy answers through ``Engine.chat`` (what ``vlmkit chat`` runs);
* generation: ``Engine.imagine`` (the checkpoint's guidance and temperature, as ``vlmkit imagine``) for every colour x shape
  prompt, with and without a position, judged by the pixel-statistics checker of ``vlmkit.builtin``;
* VQ reconstruction: encode + decode held-out scenes, judged by the same checker (the ceiling for
  generation).

    python scripts/eval_builtin.py [--model PATH] [--per-type 100] [--images-per-prompt 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict

import torch

from vlmkit.builtin import COLOURS, POSITIONS, QUESTION_TYPES, SHAPES, detect_objects, judge_image, render, sample_scene
from vlmkit.builtin.shapes import question_of_type
from vlmkit.engine import Engine


def understanding(engine: Engine, per_type: int, seed: int) -> dict:
    """{question type: (correct, total)} and a few failures."""
    rng = random.Random(f"eval:{seed}:understanding")
    size = engine.model.config.vision_config.image_size
    scores, failures = defaultdict(lambda: [0, 0]), []
    for kind in QUESTION_TYPES:
        for _ in range(per_type):
            scene = sample_scene(rng)
            question, answer = question_of_type(scene, kind, rng)
            messages = [{"role": "user", "content": [{"type": "image", "image": render(scene, size)},
                                                     {"type": "text", "text": question}]}]
            got = engine.chat(messages, max_new_tokens=24).text.strip()
            scores[kind][0] += got == answer
            scores[kind][1] += 1
            if got != answer and len(failures) < 10:
                failures.append((question, answer, got))
    return {"scores": dict(scores), "failures": failures}


def generation(engine: Engine, images_per_prompt: int, seed: int, positions: bool = True) -> dict:
    """Checker verdicts for "a {colour} {shape}" and "a {colour} {shape} {position}" prompts."""
    from vlmkit.builtin.shapes import POSITION_PHRASES
    prompts = [(f"a {c} {s}", c, s, None) for c in COLOURS for s in SHAPES]
    if positions:
        rng = random.Random(f"eval:{seed}:positions")
        prompts += [(f"a {c} {s} {POSITION_PHRASES[p]}", c, s, p)
                    for c, s, p in ((c, s, rng.choice(POSITIONS)) for c in COLOURS for s in SHAPES)]
    totals = defaultdict(lambda: [0, 0])
    failures = []
    for index, (prompt, colour, shape, position) in enumerate(prompts):
        images = engine.imagine(prompt, images_per_prompt, seed=seed * 1000 + index)
        for image in images:
            verdict = judge_image(image, colour, shape, position)
            group = "with position" if position else "no position"
            for key in ("colour", "shape"):
                totals[f"{key}"][0] += verdict[key]
                totals[f"{key}"][1] += 1
            totals["colour and shape"][0] += verdict["colour"] and verdict["shape"]
            totals["colour and shape"][1] += 1
            totals[f"colour and shape ({group})"][0] += verdict["colour"] and verdict["shape"]
            totals[f"colour and shape ({group})"][1] += 1
            if position:
                totals["position"][0] += verdict["position"]
                totals["position"][1] += 1
            if not (verdict["colour"] and verdict["shape"]) and len(failures) < 10:
                failures.append((prompt, verdict["seen"]))
    return {"scores": dict(totals), "failures": failures}


@torch.no_grad()
def reconstruction(engine: Engine, count: int, seed: int) -> dict:
    """Checker verdicts on VQ-VAE reconstructions of held-out scenes (every object compared)."""
    rng = random.Random(f"eval:{seed}:reconstruction")
    processor, model = engine.processor, engine.model
    size = model.config.vision_config.image_size
    right = total = 0
    for _ in range(count):
        scene = sample_scene(rng)
        pixels = processor.image_processor([render(scene, size)])["pixel_values"].to(model.device, model.dtype)
        decoded = model.decode_image_tokens(model.model.vqmodel.encode(pixels))
        image = processor.postprocess(list(decoded.float()), return_tensors="PIL.Image.Image")["pixel_values"][0]
        seen = sorted((o.colour, o.shape, o.position) for o in detect_objects(image))
        right += seen == sorted((o.colour, o.shape, o.position) for o in scene.objects)
        total += 1
    return {"scores": {"scene exact": [right, total]}}


def _table(title: str, scores: dict) -> str:
    lines = [f"| {title} | accuracy | n |", "|---|---:|---:|"]
    for key, (right, total) in scores.items():
        lines.append(f"| {key} | {100 * right / max(total, 1):.1f}% | {total} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--seed", type=int, default=2024, help="evaluation seed (training never draws 'eval:*')")
    parser.add_argument("--per-type", type=int, default=100, help="questions per question type")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--reconstructions", type=int, default=200)
    parser.add_argument("--skip", action="append", default=[], choices=["understanding", "generation", "reconstruction"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (docs/builtin_model.md's figures are the CPU's)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vlmkit.builtin import builtin_model_path
    from vlmkit.errors import VlmkitError
    try:
        engine = Engine.load(args.model or builtin_model_path(), device=args.device)
    except VlmkitError as err:
        print(f"eval_builtin: {err}", file=sys.stderr)
        return 1
    report = {}
    for name, run in (("understanding", lambda: understanding(engine, args.per_type, args.seed)),
                      ("generation", lambda: generation(engine, args.images_per_prompt, args.seed)),
                      ("reconstruction", lambda: reconstruction(engine, args.reconstructions, args.seed))):
        if name in args.skip:
            continue
        started = time.perf_counter()
        report[name] = run()
        print(f"\n{_table(name, report[name]['scores'])}\n({time.perf_counter() - started:.0f} s)")
        for failure in report[name].get("failures", [])[:5]:
            print("  miss:", failure)
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({k: v["scores"] for k, v in report.items()}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
