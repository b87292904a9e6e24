"""The LLaMA-style decoder-only language model (LLaMA, Qwen2) that every family's text side runs on."""

from contextlib import nullcontext
from dataclasses import field

import torch
from torch import nn
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint

from ..configs import ConfigFile, config_class, dataclass_from_dict, key_name
from ..errors import CheckpointError
from .activations import get_activation
from .attention import DecoderSelfAttention, causal_mask
from .cpu_kernels import decoder_layer_step
from .layers import Linear
from .kv_cache import KVCache
from .mlp import GatedMLP
from .norms import RMSNorm
from .rotary import RotaryEmbedding, context_length, rope_settings


# What transformers' config class for a text ``model_type`` (5.23's LlamaConfig, Qwen2Config) gives a key
# that config.json leaves out. A composite config builds its text side with the class its model_type names,
# and transformers 4 saved only the keys that differ from that class's defaults (llava-hf's Qwen2 configs
# omit max_position_embeddings 32768, for one). Keys with no entry default as the dataclass fields below.
TEXT_CONFIG_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                  attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, max_window_layers=28),
}


@config_class
class DecoderConfig(ConfigFile):
    """A text config in the checkpoint's own key names. ``from_text_config`` fills what a config omits with
    the defaults of transformers' class for its model_type (``LlamaConfig``, ``Qwen2Config`` below); the
    field defaults are LLaMA's (DeepSeek's original Janus configs list only a few keys and lean on them)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """As ``ConfigFile.to_dict``, less the sizes left to derive (None): transformers' Qwen2 would read a
        ``head_dim`` of null as the head size."""
        values = super().to_dict()
        for key in ("num_key_value_heads", "head_dim"):
            if values.get(key, 0) is None:
                del values[key]
        return values

    @classmethod
    def from_dict(cls, values: dict, where: str | None = None, **overrides) -> "DecoderConfig":
        """Build from a ``text_config``/``language_config`` dict; unknown keys are kept in ``extra``. With
        ``where`` (the file and section the dict was read from) the values are checked as a checkpoint's:
        JSON types and the sizes the attention needs, each error naming the key."""
        config = dataclass_from_dict(cls, values, where, **overrides)
        if where is not None:
            config.check_sizes(where)
        return config

    def check_sizes(self, where: str) -> None:
        """Refuse sizes the decoder cannot be built or run with (as transformers' modeling code would fail
        on them at the first forward): positive widths and counts, and query heads that share the key/value
        heads evenly (``repeat_kv``)."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise CheckpointError(f"{key_name(where, key)} is {value}; it must be at least 1")
        if self.num_hidden_layers < 0:
            raise CheckpointError(f"{key_name(where, 'num_hidden_layers')} is {self.num_hidden_layers}; it must be "
                                  f"0 or more")
        if self.num_attention_heads % self.kv_heads:
            raise CheckpointError(f"{key_name(where, 'num_attention_heads')} ({self.num_attention_heads}) is not a "
                                  f"multiple of {key_name(where, 'num_key_value_heads')} ({self.kv_heads}); each "
                                  f"key/value head serves a whole group of query heads: fix one of the two in the file")

    @classmethod
    def from_text_config(cls, values: dict | None, default_model_type: str,
                         where: str | None = "config.json: text_config") -> "DecoderConfig":
        """Build a composite config's ``text_config``: its ``model_type`` (``default_model_type`` when it names
        none, as transformers' ``SubConfigSpec``) picks the defaults of the keys it leaves out."""
        if values is not None and not isinstance(values, dict):
            dataclass_from_dict(cls, values, where)  # raises, naming the section
        values = dict(values or {})
        model_type = values.get("model_type") or default_model_type
        if not isinstance(model_type, str) or model_type not in TEXT_CONFIG_DEFAULTS:
            raise CheckpointError(f"text_config model_type {model_type!r} is not supported; vlmkit runs the "
                                  f"{' and '.join(sorted(TEXT_CONFIG_DEFAULTS))} decoders")
        config = TEXT_CONFIG_CLASSES[model_type].from_dict({**values, "model_type": model_type}, where)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in values and values[key] is None:
                setattr(config, key, None)  # null in the file: no such token (not the class default), as transformers
        config.refuse_sliding_window()
        return config

    def refuse_sliding_window(self) -> None:
        """Qwen2's sliding-window attention (``use_sliding_window``, on the layers from ``max_window_layers``
        on, or those ``layer_types`` names) is not implemented: a checkpoint whose window is shorter than its
        context is refused rather than run with full attention (a window that long changes nothing)."""
        extra = self.extra
        window = extra.get("sliding_window", 4096)
        if self.model_type != "qwen2" or not extra.get("use_sliding_window") or window is None:
            return
        layer_types = extra.get("layer_types") or [
            "sliding_attention" if i >= extra.get("max_window_layers", 28) else "full_attention"
            for i in range(self.num_hidden_layers)]
        if "sliding_attention" in layer_types and window < self.context_length:
            raise CheckpointError(f"this checkpoint's Qwen2 text model uses sliding-window attention (a window of "
                                  f"{window} tokens), which vlmkit does not implement")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope(self) -> tuple[float, dict]:
        return rope_settings({**self.extra, "max_position_embeddings": self.max_position_embeddings})

    @property
    def context_length(self) -> int:
        """The longest sequence the decoder takes: max_position_embeddings, or what its rope scaling stretches
        it to."""
        return context_length(self.max_position_embeddings, self.rope[1])

    @property
    def qkv_bias(self) -> bool:
        return True if self.model_type == "qwen2" else self.attention_bias

    @property
    def feed_forward_bias(self) -> bool:
        """Qwen2's MLP has no biases whatever the config says (transformers ignores its ``mlp_bias``)."""
        return False if self.model_type == "qwen2" else self.mlp_bias

    @property
    def output_bias(self) -> bool:
        return False if self.model_type == "qwen2" else self.attention_bias

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


class LlamaConfig(DecoderConfig):
    """transformers' ``LlamaConfig``: the decoder config with its defaults (``TEXT_CONFIG_DEFAULTS["llama"]``),
    built by keyword; what a composite config's ``text_config`` of ``model_type: llama`` reads as."""

    def __init__(self, **kwargs):
        super().__init__(**_with_defaults("llama", kwargs))


class Qwen2Config(DecoderConfig):
    """transformers' ``Qwen2Config``: the decoder config with its defaults (``TEXT_CONFIG_DEFAULTS["qwen2"]``),
    built by keyword; what a composite config's ``text_config`` of ``model_type: qwen2`` reads as."""

    def __init__(self, **kwargs):
        super().__init__(**_with_defaults("qwen2", kwargs))


TEXT_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def _with_defaults(model_type: str, values: dict) -> dict:
    """``values`` over the class's defaults, with what its ``__init__`` derives in transformers: key/value heads
    as many as the query heads, and (LLaMA) ``head_dim`` from the width."""
    values = {**TEXT_CONFIG_DEFAULTS[model_type], **values, "model_type": model_type}
    heads, width = values["num_attention_heads"], values["hidden_size"]
    if isinstance(heads, int) and heads > 0:  # else check_sizes names the key
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = heads
        if model_type == "llama" and values.get("head_dim") is None and isinstance(width, int):
            values["head_dim"] = width // heads
    return values


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    Its C++ twin: a bf16 decode step (one new position, on a CPU with vlmkit's kernels) runs the whole
    layer in one call, ``cpu_kernels.decoder_layer_step`` -> ``csrc/decode_step.cpp``
    (``decoder_layer_step_bf16``), which rounds to bf16 where these modules do;
    ``tests/test_cpu_kernels.py::test_one_call_decode_layer_step_computes_what_the_modules_compute``
    keeps the two equal. A change here is a change there."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.self_attn = DecoderSelfAttention(config.hidden_size, config.num_attention_heads, config.kv_heads,
                                              config.attention_head_dim, config.qkv_bias, config.output_bias)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.feed_forward_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, rotary, mask, cache=None, layer_index=0, last_position_only: bool = False):
        """The layer's output for every position, or with ``last_position_only`` for the last one [B, 1, H]
        (every position's keys/values still go into ``cache``): a prefill's last layer, whose other outputs
        nothing reads, skips their queries, attention, output projection and MLP."""
        if cache is not None and hidden_states.shape[1] == 1 and hidden_states.dtype == torch.bfloat16:
            # a bf16 decode step: one kernel call where it applies
            out = decoder_layer_step(self, hidden_states, rotary, mask, cache, layer_index)
            if out is not None:
                return out
        attention = self.self_attn(self.input_layernorm(hidden_states), rotary, mask, cache, layer_index,
                                   last_position_only)
        hidden_states = (hidden_states[:, -1:] if last_position_only else hidden_states) + attention
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def is_plain(self) -> bool:
        """Whether this layer is exactly the LLaMA/Qwen2 block (SiLU MLP, vlmkit's own modules, no hooks), so
        the one-call decode step computes what its modules would. Linear layers may be vlmkit's int8/int4
        ones (they have ``layer_step_parts``)."""
        modules = (self, self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm,
                   self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj, self.self_attn.o_proj,
                   self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj)
        return (type(self.self_attn) is DecoderSelfAttention and type(self.mlp) is GatedMLP
                and type(self.input_layernorm) is RMSNorm and type(self.post_attention_layernorm) is RMSNorm
                and all(type(m) is Linear or hasattr(m, "layer_step_parts") for m in modules[5:])
                and self.mlp.act is _SILU
                and not any(m._forward_hooks or m._forward_pre_hooks for m in modules))


_SILU = get_activation("silu")


class DecoderModel(nn.Module):
    """Token embeddings, decoder layers and the final norm; returns hidden states (no LM head).
    ``gradient_checkpointing``: in training, every ``checkpoint_every``-th layer's activations are recomputed
    in the backward pass (kept in host memory meanwhile with ``checkpoint_offload``)."""

    gradient_checkpointing = False
    checkpoint_every = 1
    checkpoint_offload = False

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        # the pad token's row takes no gradient in training, as in transformers' LLaMA and Qwen2 models
        pad = config.pad_token_id if isinstance(config.pad_token_id, int) and 0 <= config.pad_token_id < config.vocab_size \
            else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        theta, scaling = config.rope
        self.rotary_emb = RotaryEmbedding(config.attention_head_dim, theta, scaling)

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        """A KV cache for ``batch_size`` rows of up to ``max_len`` positions, in the model's dtype/device."""
        weight = self.embed_tokens.weight
        return KVCache(len(self.layers), batch_size, self.config.kv_heads, self.config.attention_head_dim,
                       max_len, dtype or weight.dtype, device or weight.device)

    def prepare(self, inputs_embeds, position_ids=None, attention_mask=None, cache: KVCache | None = None):
        """Rotary cos/sin and the attention mask for this forward; records the new positions in ``cache``."""
        batch, seq_len = inputs_embeds.shape[:2]
        start = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq_len, dtype=torch.bool, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = torch.arange(start, start + seq_len, device=inputs_embeds.device).expand(batch, -1)
        if cache is not None:
            cache.extend_mask(attention_mask)
            key_mask = cache.key_mask[:, :start + seq_len]
        else:
            key_mask = attention_mask.bool()
        rotary = self.rotary_emb(position_ids, inputs_embeds.dtype)
        return rotary, causal_mask(key_mask, start, seq_len)

    def checkpoints_layers(self, cache) -> bool:
        """Whether this forward runs its layers through activation checkpointing: when it is on, training,
        with gradients and no KV cache (a recomputed layer would write its keys twice)."""
        return self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()

    def forward(self, inputs_embeds, position_ids=None, attention_mask=None, cache: KVCache | None = None,
                last_position_only: bool = False, all_hidden_states: list | None = None, before_layer=None):
        """Hidden states [B, T, H] of ``inputs_embeds`` [B, T, H]; with ``last_position_only`` (a prefill, whose
        logits come from its last position) [B, 1, H], the last layer's MLP run for that position alone.
        ``before_layer(index, hidden_states)`` (IDEFICS' gated cross-attention) changes each layer's input.
        ``all_hidden_states`` (a list) receives what transformers' ``output_hidden_states`` returns: the first
        layer's input, each layer's output but the last, then the normed output of the last."""
        rotary, mask = self.prepare(inputs_embeds, position_ids, attention_mask, cache)
        hidden_states = inputs_embeds
        last = len(self.layers) - 1
        checkpointed = self.checkpoints_layers(cache)
        for index, layer in enumerate(self.layers):
            if before_layer is not None:
                hidden_states = before_layer(index, hidden_states)
            if all_hidden_states is not None and index == 0:
                all_hidden_states.append(hidden_states)
            args = (hidden_states, rotary, mask, cache, index, last_position_only and index == last)
            if checkpointed and index % self.checkpoint_every == 0:
                with save_on_cpu(pin_memory=True) if self.checkpoint_offload and hidden_states.is_cuda else nullcontext():
                    hidden_states = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden_states = layer(*args)
            if all_hidden_states is not None and index < last:
                all_hidden_states.append(hidden_states)
        if cache is not None:
            cache.advance(inputs_embeds.shape[1])
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return hidden_states
