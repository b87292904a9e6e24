"""Where loaded weights live in CPU memory: huge pages for the weights decoding streams, and freed
memory handed back to the system.

A decode step reads every linear weight once per token. In 4 KiB pages that is a TLB miss every 4 KiB;
in 2 MiB pages a bf16 or int8 decode step ran about 5% faster here (2026-11-24, Janus-Pro-1B shape, 2
threads). Neither a mapped checkpoint file nor torch's allocator gives huge pages unless the memory is
advised so (the kernel's default policy is "madvise"), hence one advised anonymous mapping per weight.
Only linear layers' weights move: embedding tables that lookups read stay in the mapped file (their
unused rows never become resident), and so do weights only image generation reads (the VQ decoder's
convolutions)."""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .mapped_safetensors import release_pages
from .mappings import MappingRegistry

HUGE_PAGE = 2 << 20
TRIM_EVERY_BYTES = 128 << 20
COPY_BLOCK_BYTES = 32 << 20
_POLICY_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_HUGE_PAGE_MAPPINGS = MappingRegistry()
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


def empty_weight(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``torch.empty`` for a weight: on a CPU, one of at least a huge page gets its own huge-page-advised
    anonymous mapping (quantized weights are written straight into it, no copy later)."""
    device = torch.device(device or "cpu")
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < HUGE_PAGE or not huge_pages_available():
        return torch.empty(shape, dtype=dtype, device=device)
    # one huge page extra, so the weight can start on a huge-page boundary (only those pages can be huge);
    # a shared anonymous mapping would be shmem, which gets no huge pages
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = _HUGE_PAGE_MAPPINGS.add(mapping)  # the weight, a view of it, keeps the mapping alive
    start = -whole.data_ptr() % HUGE_PAGE
    mapping.madvise(mmap.MADV_HUGEPAGE, start, len(mapping) - start)
    return whole[start:start + nbytes].view(dtype).view(shape)


def in_huge_pages(tensor: torch.Tensor) -> bool:
    return _HUGE_PAGE_MAPPINGS.holding(tensor) is not None


def move_to_huge_pages(model: nn.Module) -> int:
    """Move the weights of the model's linear layers (torch's, vlmkit's and its quantized ones) that are
    on the CPU and at least a huge page into huge pages, and release the file pages of those that were
    views of a mapped checkpoint. Returns how many moved."""
    if not huge_pages_available():
        return 0
    moved = since_trim = 0
    with torch.no_grad():
        for module in model.modules():
            param = getattr(module, "weight", None)
            # bitsandbytes' parameter subclasses keep their own quantization state: left alone
            if (not hasattr(module, "in_features") or type(param) is not nn.Parameter
                    or param.device.type != "cpu" or not param.is_contiguous() or in_huge_pages(param)
                    or param.numel() * param.element_size() < HUGE_PAGE):
                continue
            param.data = _copy_releasing_file_pages(param.data)
            moved += 1
            since_trim += param.numel() * param.element_size()
            if since_trim >= TRIM_EVERY_BYTES:  # the old copies' freed heap blocks, or the peak doubles
                return_freed_memory()
                since_trim = 0
    return_freed_memory()
    return moved


def _copy_releasing_file_pages(source: torch.Tensor) -> torch.Tensor:
    """A huge-page copy of ``source``, made a block at a time; a mapped file's pages are released behind
    each block, so that copying a 400 MB LM head does not hold 400 MB of file pages beside it."""
    copy = empty_weight(source.shape, source.dtype)
    flat_source, flat_copy = source.view(-1), copy.view(-1)
    block = COPY_BLOCK_BYTES // source.element_size()
    for start in range(0, flat_source.numel(), block):
        flat_copy[start:start + block].copy_(flat_source[start:start + block])
        release_pages(flat_source[start:start + block])
    return copy


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
    per token, 5-8% of a step; a prefill's activations likewise at every layer (a 2949-token
    LLaVA-OneVision-0.5B prompt: 9% of its first token on 2 Zen 4 cores, 2026-12-06). Process-wide, so set
    once a model is loaded on the CPU; long prefills hand what they freed back with ``return_freed_memory``."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(AttributeError, OSError):
            libc = ctypes.CDLL(None)
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
