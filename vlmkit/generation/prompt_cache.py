"""Keys and values of recent prompts, reused when a new prompt starts the same way with the same media.

A new request about an image already seen (another question, the next turn of a chat) shares its
prefix with an earlier prompt: template, system text and the image's placeholder tokens. Their keys
and values depend only on those tokens and on the media (causal attention), so the decoder skips them
and, when no media placeholder is left in the rest of the prompt, the vision tower too.

Entries are keyed by a hash of every media tensor of the request (pixels, image sizes...) and hold the
prompt's token ids with its keys/values; a prompt reuses the longest common token prefix of an entry
with the same media, recomputing the rest. A prompt an entry holds whole (the same request again) takes
its keys/values and its last position's logits as they were, so it answers exactly as the first time
did, in any dtype. Only single, unpadded prompts take part (that is what a chat turn or a server request
prefills). The cache empties itself when the model's weights change; a prompt that reuses part of an
entry gets the results of a full prefill up to the rounding of a differently shaped matmul."""

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.feature_cache import tensor_digest
from ..nn.kv_cache import KVCache


@dataclass
class _Entry:
    token_ids: torch.Tensor  # [T] on the CPU
    keys: torch.Tensor  # [layers, kv_heads, T, head_dim]: a view of the request's own KV cache
    values: torch.Tensor
    last_logits: torch.Tensor  # [V]: what the prompt's last position gave

    @property
    def nbytes(self) -> int:
        """What the entry keeps allocated: its request's whole KV cache (the positions that request decodes
        after its prompt too, once written)."""
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()


def media_digest(model_inputs: dict) -> bytes:
    """One key for every input besides the token ids (pixels hashed, others by value), b"" for text only."""
    parts = [name.encode() + (tensor_digest(value) if torch.is_tensor(value) else repr(value).encode())
             for name, value in sorted(model_inputs.items()) if value is not None]
    return b"|".join(parts)


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differs = (a[:n] != b[:n]).nonzero()
    return int(differs[0]) if len(differs) else n


class PromptCache:
    """Up to ``max_entries`` prompts' keys/values within ``max_bytes``, least recently used dropped
    first; ``max_entries=0`` disables it."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 1024**3):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[bytes, int], _Entry] = OrderedDict()
        self._bytes = 0
        self._weights_stamp = None
        self._serial = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def applies(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> bool:
        return (self.max_entries > 0 and type(cache) is KVCache and cache.length == 0 and input_ids.shape[0] == 1
                and cache.batch_size == 1 and not torch.is_grad_enabled()
                and (attention_mask is None or bool(attention_mask.all())))

    def restore(self, model: nn.Module, input_ids: torch.Tensor, media: bytes,
                cache: KVCache) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """Copy the longest reusable prefix of ``input_ids`` [1, T] into the empty ``cache``; returns how
        many positions it holds now (0: nothing reusable), the token ids of the prompt they came from, and,
        when that prompt was this one whole, its last position's logits [1, V] (nothing is left to run)."""
        self._drop_if_weights_changed(model)
        ids = input_ids[0].cpu()
        best, best_length = None, 0
        for (entry_media, _), entry in self._entries.items():
            if entry_media == media and entry.keys.dtype == cache.keys.dtype and entry.keys.device == cache.keys.device:
                whole = len(entry.token_ids) == len(ids) and torch.equal(entry.token_ids, ids)
                length = min(len(ids) if whole else min(common_prefix_length(entry.token_ids, ids), len(ids) - 1),
                             cache.max_len)
                if length > best_length:
                    best, best_length = entry, length
        if best is None:
            return 0, None, None
        cache.keys[:, 0, :, :best_length] = best.keys[:, :, :best_length]
        cache.values[:, 0, :, :best_length] = best.values[:, :, :best_length]
        cache.key_mask[0, :best_length] = True
        cache.length = best_length
        self.reused_tokens += best_length
        for key, entry in self._entries.items():
            if entry is best:
                self._entries.move_to_end(key)
                break
        logits = best.last_logits[None].clone() if best_length == len(ids) else None
        return best_length, best.token_ids, logits

    def store(self, model: nn.Module, input_ids: torch.Tensor, media: bytes, cache: KVCache,
              last_logits: torch.Tensor) -> None:
        """Remember the prompt ``input_ids`` [1, T] whose keys/values ``cache`` now holds, and the logits
        [1, V] its last position gave."""
        self._drop_if_weights_changed(model)
        length = input_ids.shape[1]
        # views, not copies: nothing writes a cache's positions before its length again (decoding appends;
        # beams and the server's batches index rows into new tensors), and a 118 MB copy of a Janus-Pro-1B
        # image prompt cost ~70 ms of its first token, mostly faulting in fresh pages
        entry = _Entry(input_ids[0].cpu().clone(), cache.keys[:, 0, :, :length], cache.values[:, 0, :, :length],
                       last_logits[0].detach().clone())
        if entry.nbytes > self.max_bytes:
            return
        # a prompt that extends a stored one (the next chat turn) replaces it
        for key, old in list(self._entries.items()):
            if key[0] == media and len(old.token_ids) <= length and torch.equal(old.token_ids, entry.token_ids[:len(old.token_ids)]):
                self._bytes -= self._entries.pop(key).nbytes
        self._serial += 1
        self._entries[(media, self._serial)] = entry
        self._bytes += entry.nbytes
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.nbytes

    def _drop_if_weights_changed(self, model: nn.Module) -> None:
        stamp = tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())
        if stamp != self._weights_stamp:
            self.clear()
            self._weights_stamp = stamp
