"""Quantizing while a checkpoint streams in: the weights of the linear layers chosen for quantization
are taken out of ``load_weights``' stream one tensor at a time (quantized on the spot, or read as
stored when the checkpoint is already quantized), so the full-precision model never exists in memory;
after loading, each chosen ``nn.Linear`` is replaced by its quantized module."""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..io.checkpoint import iter_checkpoint_tensors


class StreamingQuantizer:
    """One from_pretrained's quantization. ``method`` supplies ``take(name, suffix, tensor)`` (what to keep
    of one checkpoint tensor of a chosen layer: a quantized form, or the stored tensor) and
    ``build(linear, taken)`` (the quantized module replacing ``linear``); ``suffixes`` says which tensor
    names after a layer's name belong to it (``weight``, ``weight.absmax``...; the bias loads as usual)."""

    def __init__(self, method, module_names: Iterable[str], release_quantized: bool = False):
        self.method = method
        self.module_names = set(module_names)
        # safetensors tensors are views of the mapped file, never shared between names (unlike a .bin's
        # tied weights): their pages can be dropped once quantized
        self.release_quantized = release_quantized
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
                if self.release_quantized and len(pairs) == 1 and not self.method.pre_quantized:
                    release_pages(value)  # quantized: its full-precision bytes are not needed again
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
            model.set_submodule(name, self.method.build(linear, taken))
            replaced.add(f"{name}.weight")
        self.taken.clear()
        return_freed_memory()
        return missing - replaced


TRIM_EVERY_WEIGHTS = 32 << 20
_PAGE = 4096
_MADV_DONTNEED = 4


def release_pages(tensor: torch.Tensor) -> None:
    """Hand the memory pages that lie wholly inside ``tensor`` back to the system. safetensors gives
    tensors that are views into the memory-mapped file: each page read stays resident (and counts in
    the process's memory) as long as the file is mapped, which is the whole load, so quantizing a
    checkpoint would peak at its full size plus the quantized model. Dropping a quantized weight's
    pages (a private file mapping re-reads them from the file if ever touched again) keeps the peak
    near the quantized size. Pages shared with neighbouring tensors are left alone; Linux only."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def return_freed_memory() -> None:
    """Give the pages of freed heap memory back to the system (glibc's ``malloc_trim``). Quantizing
    widens each weight a few MB at a time; glibc keeps those freed blocks, scattered between the
    quantized weights: 0.6-1.6 GB more resident after loading the Janus-Pro-1B shape without this.
    Called every ``TRIM_EVERY_WEIGHTS`` weights quantized and once at the end."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(AttributeError, OSError):
            _libc().malloc_trim(0)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


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
