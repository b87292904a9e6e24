"""Train the built-in model and ship it in ``vlmkit/builtin_model/`` (one command, seeded).

    python scripts/train_builtin.py [--out build/builtin] [--resume] [--threads 2] [--no-install]

One run of ``scripts/recipes/builtin.json`` through the public training path (``vlmkit.train``, what
``vlmkit train --config scripts/recipes/builtin.json`` runs): the VQ-VAE, the vision tower, then the
joint LM, from scratch. The run folder keeps its recipe, log and a resumable checkpoint; ``--resume``
continues wherever a kill left off. Afterwards the checkpoint files (not the training state) are
copied into the package, and ``examples/`` gets a few scenes to ask about.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "scripts" / "recipes" / "builtin.json"

SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "processor_config.json", "chat_template.jinja")

EXAMPLE_SCENES = 6


def write_examples(folder: Path, image_size: int) -> list[Path]:
    """A few held-out scenes (seed namespace "examples") to try ``vlmkit chat`` on."""
    from vlmkit.builtin import caption, render, sample_scene
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random("examples:0")
    paths = []
    for index in range(EXAMPLE_SCENES):
        scene = sample_scene(rng, num_objects=1 + index % 2)
        path = folder / f"{caption(scene).replace(' ', '_')}.png"
        render(scene, image_size).save(path)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "build" / "builtin"), help="training folder")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--threads", type=int, help="override the recipe's CPU threads (the result may differ "
                                                    "in the last bits)")
    parser.add_argument("--device", default="cpu", help="train on this device (cuda for quick recipe trials; the "
                                                          "shipped weights are the CPU's)")
    parser.add_argument("--no-install", action="store_true", help="do not copy the result into the package")
    args = parser.parse_args(argv)

    from vlmkit.errors import VlmkitError
    from vlmkit.train import Interrupted, Recipe, train
    out = Path(args.out)
    started = time.perf_counter()
    recipe = Recipe.from_file(RECIPE)
    if args.threads:
        recipe.threads = args.threads
    if not (out / "model.safetensors").is_file():  # the weights are exported last: a finished run is skipped
        resume = args.resume and (out / "training" / "checkpoint.pt").is_file()
        try:
            train(None if resume else recipe, out, resume=resume, device=args.device)
        except Interrupted as stopped:
            print(f"{stopped}; continue with: python scripts/train_builtin.py --resume --out {out}", file=sys.stderr)
            return 130
        except VlmkitError as err:
            print(f"train_builtin: {err}", file=sys.stderr)
            return 1
    print(f"trained in {time.perf_counter() - started:.0f} s (this invocation)")
    if args.no_install:
        return 0
    target = ROOT / "vlmkit" / "builtin_model"
    target.mkdir(exist_ok=True)
    for name in SHIPPED_FILES:
        shutil.copyfile(Path(out) / name, target / name)
    print(f"installed into {target}")
    for path in write_examples(ROOT / "examples", recipe.model.image_size):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
