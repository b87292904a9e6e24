"""Checkpoints that differ from a tiny one in a few config values, written by `transformers` itself.

`build_variant(base_dir, out_dir, edit)` reads `base_dir`'s config.json, lets `edit(config_dict)` change it in
place, builds the model class its `architectures` names from the edited dict with random weights (the
builder's `randomize` of the family), and saves it to `out_dir` with every other file of `base_dir` (tokenizer,
processor and generation configs) copied unchanged, so the same processors read it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["build_variant"]


def build_variant(base_dir: str | os.PathLike, out_dir: str | os.PathLike, edit: Callable[[dict], None], *,
                  seed: int = 0, randomize: Callable[[torch.nn.Module, int], None] | None = None) -> Path:
    """Write the variant of the checkpoint in ``base_dir`` whose config ``edit`` made; returns ``out_dir``.
    ``randomize(model, seed)`` fills the weights (default: the Janus builder's, fine for any family)."""
    import transformers

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((base_dir / "config.json").read_text())
    edit(config)
    model_class = getattr(transformers, config["architectures"][0])
    torch.manual_seed(seed)
    model = model_class(model_class.config_class.from_dict(config)).eval()
    if randomize is None:
        from .janus import _randomize_ as randomize
    randomize(model, seed)
    model.save_pretrained(out_dir)
    for file in base_dir.iterdir():  # everything but the weights and the config, generation config included
        if file.is_file() and file.name != "config.json" and not file.name.startswith("model"):
            shutil.copy(file, out_dir / file.name)
    return out_dir
