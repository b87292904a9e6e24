"""Where loaded weights live in CPU memory: huge pages for the weights decoding streams, and freed
memory handed back to the system.

A decode step reads every linear weight once per token. In 4 KiB pages that is a TLB miss every 4 KiB;
in 2 MiB pages a bf16 or int8 decode step ran about 5% faster here (2026-11-24, Janus-Pro-1B shape, 2
threads). Neither a mapped checkpoint file nor torch's allocator gives huge pages unless the memory is
advised so (the kernel's default policy is "madvise"), hence one advised anonymous mapping per weight.
Embedding tables that only lookups read stay where they are: their unused rows never become resident."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .mapped_safetensors import release_pages

HUGE_PAGE = 2 << 20
TRIM_EVERY_BYTES = 128 << 20
_POLICY_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def huge_pages_available() -> bool:
    # VLMKIT_HUGE_PAGES=0 keeps weights in the mapped files: processes that load the same checkpoint
    # then share its pages, and loading copies nothing (1-3 s sooner for a 3 GB model)
    if not hasattr(mmap, "MADV_HUGEPAGE") or os.environ.get("VLMKIT_HUGE_PAGES", "1") == "0":
        return False
    try:
        return "[never]" not in _POLICY_FILE.read_text()
    except OSError:
        return False


def huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor in its own huge-page-advised anonymous mapping."""
    nbytes = tensor.numel() * tensor.element_size()
    # one huge page extra, so the copy can start on a huge-page boundary (only those pages can be huge)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: no THP
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping for as long as it lives
    start = -whole.data_ptr() % HUGE_PAGE
    mapping.madvise(mmap.MADV_HUGEPAGE, start, len(mapping) - start)
    copy = whole[start:start + nbytes].view(tensor.dtype).view(tensor.shape)
    return copy.copy_(tensor)


def _lookup_only(model: nn.Module) -> set[int]:
    """ids of parameters that only embedding layers hold (a tied LM head reads all of its table)."""
    holders: dict[int, set[bool]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(isinstance(module, nn.Embedding))
    return {key for key, kinds in holders.items() if kinds == {True}}


def move_to_huge_pages(model: nn.Module) -> int:
    """Move the model's CPU parameters of at least one huge page into huge pages; releases the file
    pages of weights that were views of a mapped checkpoint. Returns how many were moved."""
    if not huge_pages_available():
        return 0
    skip = _lookup_only(model)
    moved = since_trim = 0
    with torch.no_grad():
        for param in model.parameters():
            # bitsandbytes' parameter subclasses keep their own quantization state: left alone
            if (type(param) is not nn.Parameter or param.device.type != "cpu" or id(param) in skip
                    or not param.is_contiguous() or param.numel() * param.element_size() < HUGE_PAGE):
                continue
            source = param.data
            param.data = huge_page_copy(source)
            release_pages(source)
            moved += 1
            since_trim += param.numel() * param.element_size()
            if since_trim >= TRIM_EVERY_BYTES:  # the old copies' freed heap blocks, or the peak doubles
                return_freed_memory()
                since_trim = 0
    return_freed_memory()
    return moved


def return_freed_memory() -> None:
    """Give the pages of freed heap memory back to the system (glibc's ``malloc_trim``). Quantizing
    widens each weight a few MB at a time and moving weights frees their old blocks; glibc keeps such
    blocks, scattered between live ones: 0.6-1.6 GB more resident after loading the Janus-Pro-1B shape
    quantized without this."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(None).malloc_trim(0)


def keep_freed_blocks_for_reuse() -> None:
    """Let glibc keep freed memory for reuse instead of handing it back to the system at once: blocks
    under 32 MiB come from the heap, and up to 256 MiB free at its top stays mapped. Per-token
    temporaries (bitsandbytes dequantizes each weight into a fresh tensor of up to 23 MB for the
    Janus-Pro-1B shape) were otherwise faulted in page by page on every use: 60,000-90,000 page faults
    per token, 5-8% of a step. Process-wide, set once a model is loaded (after loading trimmed the heap)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(AttributeError, OSError):
            libc = ctypes.CDLL(None)
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
