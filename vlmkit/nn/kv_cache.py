"""A key/value cache allocated once per request batch and written in place.

Every row of a batch advances together (prompts are left-padded), so one fill counter serves the
whole batch; which cached positions hold real tokens is tracked by ``key_mask``.
"""

import torch

from .cpu_kernels import reusable_empty


class KVCache:
    """Preallocated keys and values for all decoder layers: [layers, batch, kv_heads, max_len, head_dim].

    Positions are read only once written (``write`` returns the filled ones), so the memory starts
    uninitialised: no pass zeroing it (25 ms of a Janus-Pro-1B first token), and the positions the answer
    has not reached yet are not resident; a large cache reuses, already resident, the memory of one that
    is gone (``cpu_kernels.reusable_empty``). Whoever leaves a gap before ``length`` (``serve.batching.
    merge_caches`` right-aligns shorter rows) zeroes it: a masked key's zero weight times a value that
    happens to be NaN would still be NaN."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.keys = reusable_empty(shape, dtype, device)
        self.values = reusable_empty(shape, dtype, device)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len
        # per layer, what its decode steps need from its modules, worked out on the first step
        # (cpu_kernels.decoder_layer_step): the modules do not change while a cache is in use
        self.layer_steps: dict[int, object] = {}

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The positions filled so far (transformers' ``Cache.get_seq_length``)."""
        return self.length

    def reserve(self, max_len: int) -> None:
        """Room for at least ``max_len`` positions, the filled ones kept. A cache that the model's ``forward``
        returns grows this way as the caller's own decoding loop feeds it back one token at a time; the
        capacity at least doubles, so a loop of n steps copies O(n) positions in all."""
        if max_len <= self.max_len:
            return
        capacity = max(max_len, 2 * self.max_len)
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = torch.empty(*old.shape[:3], capacity, old.shape[4], dtype=old.dtype, device=old.device)
            grown[:, :, :, :self.length] = old[:, :, :, :self.length]
            setattr(self, name, grown)
        key_mask = torch.zeros(self.key_mask.shape[0], capacity, dtype=torch.bool, device=self.key_mask.device)
        key_mask[:, :self.length] = self.key_mask[:, :self.length]
        self.key_mask, self.max_len = key_mask, capacity

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for ``layer`` at the current fill position; return all filled so far."""
        end = self.length + keys.shape[2]
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            # a forward with gradients that keeps a cache (transformers' default use_cache): the buffers take
            # detached copies, and attention reads the new keys/values themselves beside the cached ones, so the
            # next layer's in-place write cannot change what backward needs (no gradient flows into earlier calls)
            self.keys[layer, :, :, self.length:end] = keys.detach()
            self.values[layer, :, :, self.length:end] = values.detach()
            return (torch.cat([self.keys[layer, :, :, :self.length], keys], dim=2),
                    torch.cat([self.values[layer, :, :, :self.length], values], dim=2))
        self.keys[layer, :, :, self.length:end] = keys
        self.values[layer, :, :, self.length:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def extend_mask(self, attention_mask: torch.Tensor) -> None:
        """Record which of the positions about to be written are real tokens (``attention_mask`` [batch, T])."""
        end = self.length + attention_mask.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        self.key_mask[:, self.length:end] = attention_mask.bool()

    def advance(self, num_positions: int) -> None:
        """Mark ``num_positions`` more positions as filled (after every layer has written them)."""
        self.length += num_positions

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]
        self.key_mask = self.key_mask[rows]
