"""Rotary position embeddings (RoPE), with the scaling types LLaMA-family configs use."""

import math

import torch
from torch import nn

from .cpu_kernels import on_one_thread_if_small, rotary as cpu_rotary


def rope_settings(config: dict) -> tuple[float, dict]:
    """(theta, scaling) from a text config: transformers 5 writes ``rope_parameters``, older checkpoints
    ``rope_theta`` and ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
    scaling = params or dict(config.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def _inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    raise ValueError(f"rope scaling type {rope_type!r} is not supported")


# At most this many positions (decode steps of a batch) compute their cos/sin on one thread.
FEW_POSITIONS = 64


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions in float32, as the references do, then casts."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self._settings = (head_dim, theta, scaling or {"rope_type": "default"})
        inv_freq, self.attention_scaling = _inverse_frequencies(*self._settings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute ``inv_freq`` on ``device`` (after the module was built on the meta device)."""
        self.inv_freq = _inverse_frequencies(*self._settings)[0].to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq[None, :, None].float()
        positions = position_ids[:, None, :].float()
        # a decode step's few positions on one thread (torch's cos/sin start MKL's OpenMP team for any size)
        with on_one_thread_if_small(positions, FEW_POSITIONS), \
                torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = (inv_freq @ positions).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., head_dim] by cos/sin of the same shape (or broadcastable to it)."""
    return x * cos + rotate_half(x) * sin


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate queries and keys shaped [batch, heads, seq, head_dim] by cos/sin shaped [batch, seq, head_dim];
    queries may be the last positions only (fewer than the keys)."""
    queries = q.shape[2]
    return _rotate_heads(q, cos[:, -queries:], sin[:, -queries:]), _rotate_heads(k, cos, sin)


def _rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    fused = cpu_rotary(x, cos, sin)  # a prefill's many bf16 rows on a CPU: one C++ pass
    return fused if fused is not None else rotate(x, cos.unsqueeze(1), sin.unsqueeze(1))
