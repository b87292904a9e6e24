"""Quantizing while a checkpoint streams in: the weights of the linear layers chosen for quantization
are taken out of ``load_weights``' stream one tensor at a time (quantized on the spot, or read as
stored when the checkpoint is already quantized), so the full-precision model never exists in memory;
after loading, each chosen ``nn.Linear`` is replaced by its quantized module."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..io.checkpoint import BIN_INDEX, SAFETENSORS_INDEX, iter_checkpoint_tensors, read_json
from ..io.mapped_safetensors import release_pages
from ..io.memory import return_freed_memory


class StreamingQuantizer:
    """One from_pretrained's quantization. ``method`` supplies ``take(name, suffix, tensor)`` (what to keep
    of one checkpoint tensor of a chosen layer: a quantized form, or the stored tensor) and
    ``build(linear, taken)`` (the quantized module replacing ``linear``); ``suffixes`` says which tensor
    names after a layer's name belong to it (``weight``, ``weight.absmax``...; the bias loads as usual)."""

    def __init__(self, method, module_names: Iterable[str], files: list[Path] | None = None):
        self.method = method
        self.files = files or []
        self.module_names = set(module_names)
        self._since_trim = 0
        self.taken: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    @property
    def optional(self) -> tuple[str, ...]:
        """Patterns of model tensors ``load_weights`` may find missing: the chosen layers' own weights."""
        return tuple(f"^{re.escape(name)}\\.weight$" for name in sorted(self.module_names))

    def wrap_rename(self, rename: Callable | None) -> Callable:
        """``rename`` (the family's checkpoint-name mapping) followed by taking the chosen layers' tensors."""

        def quantizing_rename(name: str, tensor: torch.Tensor):
            pairs = rename(name, tensor) if rename else [(name, tensor)]
            kept = []
            for target, value in pairs:
                owner = self._owner(target)
                if owner is None:
                    kept.append((target, value))
                    continue
                suffix = target[len(owner) + 1:]
                self.taken[owner][suffix] = self.method.take(owner, suffix, value)
                if not self.method.pre_quantized:
                    release_pages(value)  # quantized: its full-precision file pages are not needed again
                self._since_trim += value.numel()
                if self._since_trim >= TRIM_EVERY_WEIGHTS:  # and the float blocks that quantizing widened
                    return_freed_memory()
                    self._since_trim = 0
            return kept

        return quantizing_rename

    def _owner(self, target: str) -> str | None:
        head = target
        while "." in head:
            head, _ = head.rsplit(".", 1)
            if head in self.module_names:
                suffix = target[len(head) + 1:]
                return head if suffix in self.method.suffixes or suffix.startswith("weight.") else None
        return None

    def finish(self, model: nn.Module, missing: set[str]) -> set[str]:
        """Swap each chosen layer that received its weight for the quantized module; returns ``missing``
        without those weights (a chosen layer whose weight the checkpoint lacks, a tied LM head, stays)."""
        replaced = set()
        for name, taken in self.taken.items():
            if "weight" not in taken:
                continue
            linear = model.get_submodule(name)
            self._check_stored(name, linear, taken)
            model.set_submodule(name, self.method.build(linear, taken))
            replaced.add(f"{name}.weight")
        self.taken.clear()
        return_freed_memory()
        return missing - replaced

    def _check_stored(self, name: str, linear: nn.Module, taken: dict) -> None:
        check = getattr(self.method, "stored_problem", None)
        if not self.method.pre_quantized or check is None:
            return
        problem = check(name, linear, taken)
        if problem:
            raise CheckpointError(f"{self._file_of(name + '.weight')}: {problem}. This quantized checkpoint is "
                                  f"damaged: save or download it again")

    def _file_of(self, tensor_name: str) -> str:
        """The weight file holding ``tensor_name`` (a shard index says which), else the checkpoint folder."""
        if len(self.files) == 1:
            return str(self.files[0])
        if not self.files:
            return "the checkpoint"
        for index in (SAFETENSORS_INDEX, BIN_INDEX):
            if (self.files[0].parent / index).is_file():
                shard = read_json(self.files[0].parent / index).get("weight_map", {}).get(tensor_name)
                if isinstance(shard, str):
                    return str(self.files[0].parent / shard)
        return str(self.files[0].parent)


TRIM_EVERY_WEIGHTS = 32 << 20


def checkpoint_tensor_names(files, rename: Callable | None) -> list[str]:
    """The model-side names of every tensor in ``files`` (headers only for safetensors), through ``rename``."""
    placeholder = torch.empty(0)
    names = []
    for name, _ in iter_checkpoint_tensors(files):
        names.extend(target for target, _ in (rename(name, placeholder) if rename else [(name, placeholder)]))
    return names


def plain_linear_names(model: nn.Module) -> list[str]:
    """Names of the model's plain linear layers (``nn.Linear`` or vlmkit's ``Linear``, no subclasses such
    as IDEFICS's decoupled LM head): the layers quantization may replace."""
    from ..nn.layers import Linear
    return [name for name, module in model.named_modules() if type(module) in (nn.Linear, Linear)]
