"""Gated cross-attention from text to images (Flamingo style), and what it keeps per request.

Before every ``cross_layer_interval``-th decoder layer, text positions attend to the image features
through a block whose two residual branches are scaled by tanh gates (``alpha_cross_attn``,
``alpha_dense``). The image keys/values of every such block are computed once per request
(`ImageContext`) and kept with the KV cache (`IdeficsCache`) so decoding steps reuse them.
"""

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from ...nn.kv_cache import KVCache
from ...nn.mlp import GatedMLP
from ...nn.norms import RMSNorm
from .config import IdeficsConfig


@dataclass
class ImageContext:
    """The images as the gated cross-attention layers see them.

    ``keys_values[i]``: layer i's keys and values [batch, heads, images * image_seq_len, head_dim];
    ``mask`` [batch, 1, T, images * image_seq_len]: which image positions each text position attends to;
    ``gate`` [batch, T, 1]: text positions that attend to at least one image."""

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    gate: torch.Tensor

    @classmethod
    def build(cls, keys_values, image_attention_mask: torch.Tensor, image_seq_len: int) -> "ImageContext":
        """From the processor's ``image_attention_mask`` [batch, T, images] (1 where a text position may see
        an image), every image contributing ``image_seq_len`` key positions."""
        allowed = image_attention_mask.bool().repeat_interleave(image_seq_len, dim=-1)
        gate = allowed.any(dim=-1, keepdim=True)
        # A position that may see no image (text before the first image, padding) still gets an attention
        # output, which the gate then zeroes as the reference does; letting it attend everywhere keeps that
        # output finite instead of the NaN of a fully masked softmax.
        return cls(keys_values, (allowed | ~gate)[:, None], gate)

    def last_position(self) -> "ImageContext":
        """The context for decoding: new tokens see the images the prompt's last position saw (the
        reference repeats that row of ``image_attention_mask`` for every generated token)."""
        return replace(self, mask=self.mask[:, :, -1:], gate=self.gate[:, -1:])

    def select_rows(self, rows: torch.Tensor) -> "ImageContext":
        return ImageContext([(k[rows], v[rows]) for k, v in self.keys_values], self.mask[rows], self.gate[rows])


class IdeficsCache(KVCache):
    """The decoder's KV cache plus the request's `ImageContext` (set by prefill, read by decode)."""

    images: ImageContext | None = None

    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)
        if self.images is not None:
            self.images = self.images.select_rows(rows)

    def join_extra(self, parts: list["IdeficsCache"]) -> None:
        """The joined rows' image contexts (decode-time, one text position each), so requests with
        different numbers of images, or none, decode in one batch: image keys are zero-padded to the
        longest and the padding is masked; rows without images get a closed gate."""
        contexts = [part.images for part in parts]
        template = next((c for c in contexts if c is not None), None)
        if template is None:
            self.images = None
            return
        longest = max(c.mask.shape[-1] for c in contexts if c is not None)
        keys_values, masks, gates = [[] for _ in template.keys_values], [], []
        for part, context in zip(parts, contexts):
            rows = part.batch_size
            for layer, (keys, _) in enumerate(template.keys_values):
                shape = (rows, keys.shape[1], longest, keys.shape[3])
                padded_keys, padded_values = keys.new_zeros(shape), keys.new_zeros(shape)
                if context is not None:
                    own_keys, own_values = context.keys_values[layer]
                    padded_keys[:, :, :own_keys.shape[2]] = own_keys
                    padded_values[:, :, :own_values.shape[2]] = own_values
                keys_values[layer].append((padded_keys, padded_values))
            mask = template.mask.new_zeros((rows, 1, 1, longest))
            if context is None:
                mask[...] = True  # attends to zeros; the closed gate discards it (finite, never NaN)
                gates.append(template.gate.new_zeros((rows, 1, 1)))
            else:
                mask[..., :context.mask.shape[-1]] = context.mask
                gates.append(context.gate)
            masks.append(mask)
        self.images = ImageContext([(torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer]))
                                    for layer in keys_values], torch.cat(masks), torch.cat(gates))


class ImageCrossAttention(nn.Module):
    """Text queries against image keys/values; no rotary positions. With ``qk_layer_norms``, per-head
    RMS norms on queries and keys."""

    def __init__(self, hidden_size: int, num_heads: int, image_width: int, qk_layer_norms: bool, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(image_width, hidden_size, bias=False)
        self.v_proj = nn.Linear(image_width, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_layer_norm = RMSNorm(self.head_dim, eps) if qk_layer_norms else None
        self.k_layer_norm = RMSNorm(self.head_dim, eps) if qk_layer_norms else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def image_keys_values(self, image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [batch, heads, L, head_dim] of image features [batch, L, image_width]."""
        keys, values = self._heads(self.k_proj(image_states)), self._heads(self.v_proj(image_states))
        if self.k_layer_norm is not None:
            keys = self.k_layer_norm(keys)
        return keys, values

    def forward(self, hidden_states, keys, values, mask) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        queries = self._heads(self.q_proj(hidden_states))
        if self.q_layer_norm is not None:
            queries = self.q_layer_norm(queries)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class GatedCrossAttentionLayer(nn.Module):
    """x + tanh(alpha_cross_attn) * gate * xattn(norm(x)), then x + tanh(alpha_dense) * mlp(norm(x)).

    The dense branch applies to every position, including those that see no image."""

    def __init__(self, config: IdeficsConfig):
        super().__init__()
        text = config.text_config
        self.cross_attn = ImageCrossAttention(text.hidden_size, text.num_attention_heads, config.image_width,
                                              config.qk_layer_norms, text.rms_norm_eps)
        self.mlp = GatedMLP(text.hidden_size, text.intermediate_size, text.hidden_act)
        self.input_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        gate_shape = (1, 1, text.hidden_size) if config.alpha_type == "vector" else (1,)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(gate_shape))
        self.alpha_dense = nn.Parameter(torch.zeros(gate_shape))

    def forward(self, hidden_states: torch.Tensor, images: ImageContext | None, index: int) -> torch.Tensor:
        """``images`` None means no position sees an image: the attention branch is exactly zero then."""
        if images is not None:
            keys, values = images.keys_values[index]
            attended = self.cross_attn(self.input_layernorm(hidden_states), keys, values, images.mask)
            attended = attended.masked_fill(~images.gate, 0.0)
            hidden_states = hidden_states + torch.tanh(self.alpha_cross_attn) * attended
        dense = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + torch.tanh(self.alpha_dense) * dense
