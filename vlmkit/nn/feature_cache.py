"""Vision features remembered by image content: an image that comes again (the next turn of a chat, a
new request about the same picture) skips the vision tower.

Keys are a hash of each image's pixel tensor (dtype, shape and bytes), so only an identical input
hits; entries are dropped least recently used first, within a count and a byte budget. Features are
computed per image exactly as without the cache (rows of a batched tower are independent), and the
cache empties itself when the weights that produce them change (``load_state_dict``, an optimizer
step, ``model.to``)."""

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """A content hash of a tensor: its dtype, shape and bytes."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.blake2b(f"{tensor.dtype}{tuple(tensor.shape)}".encode(), digest_size=20)
    digest.update(memoryview(data))
    return digest.digest()


class FeatureCache:
    """Per-image features keyed by ``tensor_digest`` of the image's pixels; ``max_entries=0`` disables."""

    def __init__(self, max_entries: int = 32, max_bytes: int = 512 * 1024**2):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._weights_stamp = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def features(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
                 producers: tuple[nn.Module, ...] = ()) -> torch.Tensor:
        """``compute(images)`` [N, ...] -> [N, ...], running ``compute`` only on images not seen before
        (as one batch). ``producers``: the modules whose weights the features depend on; while autograd
        could train them the cache is bypassed."""
        parameters = [p for module in producers for p in module.parameters()]
        if self.max_entries <= 0 or (torch.is_grad_enabled() and any(p.requires_grad for p in parameters)):
            return compute(images)
        self._drop_if_weights_changed(parameters)
        keys = [tensor_digest(image) for image in images]
        missing = list(dict.fromkeys(k for k in keys if k not in self._entries))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        found = {k: self._entries[k] for k in keys if k in self._entries}
        if missing:
            first = {k: keys.index(k) for k in missing}
            computed = compute(images[[first[k] for k in missing]])
            for key, features in zip(missing, computed):
                found[key] = features.clone()
                self._store(key, found[key])
        for key in found:
            if key in self._entries:
                self._entries.move_to_end(key)
        return torch.stack([found[k] for k in keys])

    def _store(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = features
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()

    def _drop_if_weights_changed(self, parameters: list[nn.Parameter]) -> None:
        stamp = tuple((p.data_ptr(), p._version, p.dtype) for p in parameters)
        if stamp != self._weights_stamp:
            self.clear()
            self._weights_stamp = stamp
