"""Reading .safetensors files without copying: every tensor is a view of one private (copy-on-write)
memory map of its file, so loading copies nothing and only the pages a model touches become resident
(an embedding table's unused rows never do). safetensors' own ``get_tensor`` copies each tensor into
fresh memory, which holds the whole checkpoint resident even where the model keeps a quantized copy."""

from __future__ import annotations

import json
import math
import mmap
import os

import torch

from .mappings import MappingRegistry

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
_FILE_MAPPINGS = MappingRegistry()


def release_pages(tensor: torch.Tensor) -> bool:
    """Drop a tensor's resident pages if it is a view of a mapped file, once the model holds a copy of it
    elsewhere: they count in the process's memory until the whole file is unmapped. For views nothing
    wrote into (a loaded weight before use): a later read of the view reads the file again, while a
    written (private) page would go back to the file's content. Pages shared with a neighbouring tensor
    stay. Returns whether the tensor was such a view."""
    found = _FILE_MAPPINGS.holding(tensor)
    if found is None:
        return False
    mapping, offset = found
    first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (offset + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
    return True


class MappedSafetensors:
    """One .safetensors file: ``keys()`` and ``get_tensor(name)``, as safetensors' ``safe_open``. Raises
    ValueError naming the problem for a file that is not a well-formed safetensors file."""

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            # writes (training from these weights) go to private pages, never to the file
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        _FILE_MAPPINGS.add(self._map)
        header_length = int.from_bytes(self._map[:8], "little")
        if header_length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"header length {header_length} does not fit the {size}-byte file")
        try:
            header = json.loads(bytes(self._map[8:8 + header_length]))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")  # noqa: TRY004 (a malformed file, not a caller bug)
        header.pop("__metadata__", None)
        self._start = 8 + header_length
        self._entries = {name: self._entry(name, info, size - self._start) for name, info in header.items()}

    @staticmethod
    def _entry(name: str, info, data_bytes: int) -> tuple[torch.dtype, list[int], int, int]:
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r}: bad entry {str(info)[:200]}") from None
        expected = math.prod(shape) * dtype.itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes
                and end - begin == expected and min(shape, default=0) >= 0):
            raise ValueError(f"tensor {name!r}: offsets {begin}..{end} do not hold shape {shape} of {info['dtype']} "
                             f"within the file's {data_bytes} data bytes")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``, read from the header (nothing is loaded)."""
        return self._entries[name][0]

    def get_tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        offset = self._start + begin
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        if offset % dtype.itemsize:  # not aligned for its element type: a copy
            return torch.frombuffer(bytearray(self._map[offset:self._start + end]), dtype=dtype).reshape(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=offset).reshape(shape)

