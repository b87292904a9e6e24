"""``BatchFeature``: what a tokenizer or processor returns, a dict of model inputs that also reads as
attributes (``inputs.input_ids``) and moves with ``.to``, as transformers' ``BatchEncoding`` and
``BatchFeature`` do; and ``as_return_type``, which gives it the form a call's ``return_tensors`` asks for."""

import numpy as np
import torch

from ..errors import InputError


class BatchFeature(dict):
    """A dict of model inputs with attribute access and a ``.to`` that casts floating tensors only."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def data(self) -> dict:
        """The features themselves (transformers' ``BatchFeature.data``): this dict."""
        return self

    def to(self, device=None, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "BatchFeature":
        """Move tensors to ``device`` and cast only floating tensors (pixels) to ``dtype``, never token ids; in
        place, returning this same object, as transformers' ``BatchFeature.to`` does (``non_blocking`` too)."""
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else None,
                                     non_blocking=non_blocking)
        return self


def as_return_type(features: dict, return_tensors: str | None) -> dict:
    """``features`` (token rows as lists, pixels as tensors) in the form ``return_tensors`` asks for:
    ``"pt"`` torch tensors, ``"np"`` numpy arrays, None lists (pixels one numpy array per image or
    prompt, as transformers returns them)."""
    out = type(features)()
    for key, value in features.items():
        if return_tensors is None:
            out[key] = _as_lists(key, value)
        elif isinstance(value, list):
            out[key] = _rows_as_array(key, value, return_tensors)
        elif isinstance(value, torch.Tensor) and return_tensors == "np":
            out[key] = value.numpy()
        else:
            out[key] = value
    return out


def _rows_as_array(key: str, rows: list, return_tensors: str):
    lengths = {len(row) for row in rows if isinstance(row, (list, tuple))}
    if len(lengths) > 1 and return_tensors == "np":  # ragged rows: an object array of rows, as transformers'
        ragged = np.empty(len(rows), dtype=object)
        ragged[:] = [np.asarray(row, dtype=np.int64) for row in rows]
        return ragged
    if len(lengths) > 1:
        raise InputError(f"the prompts' {key} have different lengths ({min(lengths)}-{max(lengths)} tokens), so "
                         f"they cannot form one tensor: pass padding=True (or padding='max_length' with a "
                         f"max_length at least as long as the longest prompt, or truncation=True)")
    array = np.asarray(rows, dtype=np.int64)
    return torch.from_numpy(array) if return_tensors == "pt" else array


def _as_lists(key: str, value):
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return list(value.numpy())
    if key == "image_sizes":
        return [tuple(size) for size in value.tolist()]
    return value.tolist()
