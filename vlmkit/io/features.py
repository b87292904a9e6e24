"""``BatchFeature``: what a tokenizer or processor returns, a dict of model inputs that also reads as
attributes (``inputs.input_ids``) and moves with ``.to``, as transformers' ``BatchEncoding`` and
``BatchFeature`` do."""

import torch


class BatchFeature(dict):
    """A dict of model inputs with attribute access and a ``.to`` that casts floating tensors only."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BatchFeature":
        """Move tensors to ``device``; cast only floating tensors (pixels) to ``dtype``, never token ids."""
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        moved = BatchFeature()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            moved[key] = value
        return moved
