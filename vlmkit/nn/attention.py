"""Attention layers on torch's scaled_dot_product_attention: causal decoder self-attention with
grouped-query heads and a KV cache, and the mask that goes with it."""

import torch
from torch import nn
from torch.nn import functional as F

from .cpu_kernels import decode_attention, prefill_attention
from .layers import Linear, project
from .rotary import apply_rotary


def causal_mask(key_mask: torch.Tensor, query_start: int, query_len: int) -> torch.Tensor | None:
    """Boolean mask [batch, 1, query_len, key_len] for queries at positions ``query_start...``.

    ``key_mask`` [batch, key_len] marks real (non-pad) keys. Returns None when a plain causal or
    unmasked attention is exact, so SDPA can take its fastest path. Pad query rows stay fully
    masked: SDPA returns zeros for them, as the reference does."""
    key_len = key_mask.shape[1]
    if bool(key_mask.all()):
        if query_len == 1 or (query_start == 0 and query_len == key_len):
            return None
    positions = torch.arange(key_len, device=key_mask.device)
    query_positions = torch.arange(query_start, query_start + query_len, device=key_mask.device)
    allowed = positions[None, :] <= query_positions[:, None]
    return (allowed[None] & key_mask[:, None, :])[:, None]


class DecoderSelfAttention(nn.Module):
    """Multi-head / grouped-query self-attention with rotary positions (LLaMA, Qwen2)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.q_proj = Linear(hidden_size, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(num_heads * self.head_dim, hidden_size, bias=out_bias)

    def forward(self, hidden_states, rotary, mask, cache=None, layer_index: int = 0, last_query_only: bool = False):
        """The attention output of every position [B, T, H]; with ``last_query_only`` of the last one
        [B, 1, H], every position's keys and values still computed (and written to ``cache``): a prefill's
        last layer, whose other outputs nothing reads, skips their queries, attention and output projection."""
        batch, seq_len, _ = hidden_states.shape
        queries = 1 if last_query_only else seq_len
        if last_query_only:
            q, k, v = self.q_proj(hidden_states[:, -1:]), *project(hidden_states, self.k_proj, self.v_proj)
        else:
            q, k, v = project(hidden_states, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(batch, queries, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, *rotary)
        if cache is not None:
            k, v = cache.write(layer_index, k, v)
        if mask is not None:
            mask = mask[:, :, -queries:]
        is_causal = mask is None and queries > 1 and k.shape[2] == queries  # the last query alone sees every key
        out = decode_attention(q, k, v, mask) if queries == 1 else prefill_attention(q, k, v, mask, is_causal)
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, queries, -1))
