"""Rotary position embeddings (RoPE), with the scaling types LLaMA-family configs use: linear, llama3, YaRN and
dynamic NTK, each computed as transformers' modeling_rope_utils.py does (tests/test_rope_scaling.py)."""

import math

import torch
from torch import nn

from ..errors import CheckpointError
from .cpu_kernels import on_one_thread_if_small, rotary as cpu_rotary


# The rope types vlmkit computes, each as transformers' modeling_rope_utils does.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def rope_settings(config: dict) -> tuple[float, dict]:
    """(theta, scaling) from a text config dict (with its ``max_position_embeddings``), as transformers 5's
    ``convert_rope_params_to_dict`` / ``standardize_rope_params`` read it: transformers 4's ``rope_scaling``
    (``type`` for ``rope_type``) wins over ``rope_parameters``; theta comes from that dict, else
    ``rope_theta``, else 10000. A rope type vlmkit does not compute is a CheckpointError here, at load."""
    given = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(given, dict):
        raise CheckpointError(f"the text config's rope_scaling / rope_parameters must be a JSON object, got "
                              f"{given!r:.60}; fix it in config.json")
    scaling = dict(given)
    theta = scaling.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
    for key, value in (("rope_theta", theta), *((k, scaling.get(k)) for k in _NUMERIC_KEYS)):
        positive = key in ("rope_theta", "factor", "original_max_position_embeddings")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < 0 or (positive and value == 0)):
            raise CheckpointError(f"the text config's {key} must be a {'positive' if positive else 'non-negative'} "
                                  f"number, got {value!r:.60}; fix it in config.json")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    scaling["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"rope type {rope_type!r} (rope_parameters / rope_scaling of the text config) is not "
                              f"supported; vlmkit computes {', '.join(map(repr, SUPPORTED_ROPE_TYPES))}")
    if rope_type in ("llama3", "yarn"):
        # the pretraining length: a config's own top-level key wins (Phi-3's habit), else max_position_embeddings
        top_level = config.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = top_level or scaling.get(
            "original_max_position_embeddings", config.get("max_position_embeddings"))
    if rope_type in ("dynamic", "yarn"):  # dynamic's limit; YaRN's factor where a config gives none
        scaling["max_position_embeddings"] = config.get("max_position_embeddings")
    for key in _REQUIRED_KEYS.get(rope_type, ()):
        if scaling.get(key) is None:
            raise CheckpointError(f"rope type {rope_type!r} needs {key!r} in the text config's rope_parameters")
    return float(theta), scaling


def context_length(max_position_embeddings: int, scaling: dict) -> int:
    """The positions a rope scaling is made for, as vLLM reads a config: linear and dynamic NTK stretch
    ``max_position_embeddings`` by their factor, YaRN its original length by its factor (Qwen2.5's recipe adds
    YaRN and keeps max_position_embeddings); llama3 configs already give the stretched length."""
    rope_type, factor = scaling["rope_type"], scaling.get("factor")
    if rope_type in ("linear", "dynamic"):
        return int(max_position_embeddings * factor)
    if rope_type == "yarn":
        original = scaling["original_max_position_embeddings"]
        return max(max_position_embeddings, int(original * (factor or max_position_embeddings / original)))
    return max_position_embeddings


# the rope settings that are numbers (transformers' RopeParameters), checked at load rather than inside torch
_NUMERIC_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
                 "beta_slow", "attention_factor", "mscale", "mscale_all_dim")
_REQUIRED_KEYS = {"linear": ("factor",), "dynamic": ("factor", "max_position_embeddings"),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                  "yarn": ("original_max_position_embeddings",)}


def _default_frequencies(head_dim: int, theta) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention scaling of cos/sin) at load; "dynamic" starts from the frequencies of
    ``max_position_embeddings`` (the default ones) and ``RotaryEmbedding`` recomputes them past it."""
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return _default_frequencies(head_dim, theta), 1.0
    if rope_type == "linear":
        return _default_frequencies(head_dim, theta) / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_frequencies(_default_frequencies(head_dim, theta), scaling), 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(head_dim, theta, scaling)
    if rope_type == "dynamic":
        return dynamic_ntk_frequencies(head_dim, theta, scaling, scaling["max_position_embeddings"]), 1.0
    raise CheckpointError(f"rope type {rope_type!r} is not supported")  # rope_settings refused it already


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_frequencies(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers' ``_compute_yarn_parameters``: per frequency, a ramp between the
    original (fast rotations) and the ``factor``-interpolated ones (slow), and cos/sin scaled by the returned
    attention factor (0.1 ln(factor) + 1 unless the config says otherwise)."""
    old_context = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:  # DeepSeek-V3's configs: the ratio of the two lengths
        factor = scaling["max_position_embeddings"] / old_context

    def mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return (head_dim * math.log(old_context / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as the reference: no division by zero
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def dynamic_ntk_frequencies(head_dim: int, theta: float, scaling: dict, seq_len) -> torch.Tensor:
    """Dynamic NTK: the default frequencies of a base grown with ``seq_len`` past ``max_position_embeddings``,
    as transformers' ``_compute_dynamic_ntk_parameters``, whose arithmetic (a Python number at load, a float32
    tensor once ``seq_len`` is the positions' tensor) is kept so the frequencies match to the bit."""
    factor, limit = scaling["factor"], scaling["max_position_embeddings"]
    if isinstance(seq_len, torch.Tensor):
        seq_len = torch.maximum(seq_len, torch.tensor(limit, dtype=seq_len.dtype, device=seq_len.device))
    else:
        seq_len = max(seq_len, limit)
    base = theta * ((factor * seq_len / limit) - (factor - 1)) ** (head_dim / (head_dim - 2))
    device = seq_len.device if isinstance(seq_len, torch.Tensor) else None
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
                           / head_dim))


# At most this many positions (decode steps of a batch) compute their cos/sin on one thread.
FEW_POSITIONS = 64


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions in float32, as the references do, then casts.

    With "dynamic" scaling it keeps transformers' state (``dynamic_rope_update``): a forward whose positions
    reach past every length seen so far recomputes the frequencies for that length (so a decode step past
    ``max_position_embeddings`` rotates its new key with the frequencies of the sequence so far, and the cached
    keys keep theirs), and a forward shorter than ``max_position_embeddings`` after a longer one returns to the
    original frequencies. Below the limit it is the default rotary."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self._settings = (head_dim, theta, scaling or {"rope_type": "default"})
        inv_freq, self.attention_scaling = _inverse_frequencies(*self._settings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._reset_dynamic_state(inv_freq)

    def _reset_dynamic_state(self, inv_freq: torch.Tensor) -> None:
        scaling = self._settings[2]
        self.original_max_seq_len = scaling.get("max_position_embeddings") if scaling["rope_type"] == "dynamic" \
            else None
        self.max_seq_len_cached = self.original_max_seq_len
        self.original_inv_freq = inv_freq

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute ``inv_freq`` on ``device`` (after the module was built on the meta device)."""
        self.inv_freq = _inverse_frequencies(*self._settings)[0].to(device)
        self._reset_dynamic_state(self.inv_freq)

    def _update_dynamic_frequencies(self, position_ids: torch.Tensor) -> None:
        # transformers' dynamic_frequency_update, step for step (the lengths are tensors there too)
        seq_len = torch.max(position_ids) + 1
        cached = self.max_seq_len_cached
        if seq_len > cached:
            head_dim, theta, scaling = self._settings
            self.inv_freq = dynamic_ntk_frequencies(head_dim, theta, scaling, seq_len)
            self.max_seq_len_cached = seq_len
        if seq_len < self.original_max_seq_len and cached > self.original_max_seq_len:
            self.inv_freq = self.original_inv_freq.to(position_ids.device)
            self.max_seq_len_cached = self.original_max_seq_len

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.original_max_seq_len is not None:
            self._update_dynamic_frequencies(position_ids)
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
