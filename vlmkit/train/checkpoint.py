"""Writing training state and exported weights safely: every file is written to a temporary name
and renamed into place, so a run killed mid-write leaves the previous file intact."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import VlmkitError
from ..io.checkpoint import resolve_dtype


class Diverged(VlmkitError):
    """A loss or an exported weight is not finite: the run stopped without exporting its weights."""


def _replace_atomically(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_training_state(path: Path, state: dict) -> None:
    """``torch.save`` ``state`` (model, optimizer, step...) to ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    _replace_atomically(tmp, path)


def load_training_state(path: Path) -> dict:
    """A state written by ``save_training_state`` (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def transformers_state_dict(model, dtype="float32") -> dict[str, torch.Tensor]:
    """The model's weights (its names are transformers' Janus names), in ``dtype``."""
    target = resolve_dtype(dtype, {})
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        state[name] = (tensor.to(target) if tensor.is_floating_point() else tensor).contiguous().clone()
    return state


def export_weights(model, folder: Path, dtype="float32") -> Path:
    """Write ``model.safetensors`` in the transformers layout into ``folder`` (atomically)."""
    from safetensors.torch import save_file

    state = transformers_state_dict(model, dtype)
    # a last guard: NaN weights (a loss the step checks missed) or ones too large for ``dtype`` (float16
    # overflows at 65,504) would export a checkpoint that only draws and says noise
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise Diverged(f"{len(bad)} of the trained weights hold NaN or infinity in {dtype} (first: {bad[0]}); nothing "
                       f"was exported. Lower the learning rates, or export in float32 (export_dtype), and start "
                       f"again in a new --out folder")
    path = Path(folder) / "model.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    _replace_atomically(tmp, path)
    return path
