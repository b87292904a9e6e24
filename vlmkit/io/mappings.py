"""Which live memory map, if any, holds a tensor: the loader's file mappings and the huge-page mappings
of weights are plain ``mmap`` objects that tensors view through ``torch.frombuffer``."""

from __future__ import annotations

import mmap
import weakref

import torch


class MappingRegistry:
    def __init__(self):
        self._entries: list[tuple[int, int, weakref.ref]] = []  # (address, length, mapping)

    def add(self, mapping: mmap.mmap) -> torch.Tensor:
        """Register ``mapping``; returns all of it as a uint8 tensor (which keeps it alive)."""
        whole = torch.frombuffer(mapping, dtype=torch.uint8)
        self._entries = [entry for entry in self._entries if entry[2]() is not None]
        self._entries.append((whole.data_ptr(), len(mapping), weakref.ref(mapping)))
        return whole

    def holding(self, tensor: torch.Tensor) -> tuple[mmap.mmap, int] | None:
        """(mapping, offset of the tensor's first byte in it) if one registered mapping holds all of it."""
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        for address, length, mapping_ref in self._entries:
            if address <= begin and end <= address + length:
                mapping = mapping_ref()
                if mapping is not None:
                    return mapping, begin - address
        return None
