"""transformers' 8-bit and 4-bit path: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
puts bitsandbytes' own ``Linear8bitLt`` / ``Linear4bit`` (with its ``Int8Params`` / ``Params4bit``) on
exactly the layers transformers 5 converts, so results match the reference:

* every plain ``nn.Linear`` (not subclasses: IDEFICS's decoupled LM head stays, as in transformers),
  vision towers, projectors and Janus's generation head included;
* except, when ``llm_int8_skip_modules`` is None, transformers' default skips: the output embedding
  (``lm_head`` and what it holds), tied weights, and the module holding the model's last parameter;
  when it is given, only the modules it names (transformers' matching: a name prefix at a module
  boundary, a regex, or a suffix), matched against vlmkit's and transformers' module names.

Checkpoints that transformers saved in 8 or 4 bits load as stored."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import InputError
from .config import BitsAndBytesConfig
from .loading import plain_linear_names

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or an error naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise InputError(f"8-bit and 4-bit loading with BitsAndBytesConfig needs bitsandbytes ({err}): "
                         f"pip install 'vlmkit[bnb]' -- or use vlmkit's own quantization_config='int8' / "
                         f"'int4', which needs nothing else") from None
    return bitsandbytes


def keep_packable_for_cpu(module: nn.Module) -> None:
    """On CPUs with AVX-512 BF16, bitsandbytes' ``Linear4bit`` repacks its weight at the first forward for
    its fast CPU kernel, which takes outputs in blocks of 32 and inputs in whole quantization blocks; for
    any other layer it raises (``shape '[32, 0]' is invalid``), in transformers too. Such a layer keeps
    bitsandbytes' generic CPU path instead (the same 4-bit arithmetic)."""
    state = module.weight.quant_state
    packable = module.out_features % 32 == 0 and module.in_features % state.blocksize == 0
    if getattr(module, "support_avx512bf16_for_cpu", False) and not packable:
        module.support_avx512bf16_for_cpu = False


def unpack_before_saving(module: nn.Module, prefix: str = "", keep_vars: bool = False) -> None:
    """A state-dict pre-hook for a ``Linear4bit``: bitsandbytes' own undoing of its CPU repacking (run by
    ``_save_to_state_dict``) leaves the block scales transposed and in bf16 unless double quantization is on,
    so saving after a forward wrote scrambled scales and changed the live layer's answers. Undone here in
    full first: the weight and its scales as they were, less the bf16 rounding the layer computes with."""
    state = getattr(module.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nested = state.original_nested
    transposed = state.absmax
    module.weight.data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
    if not nested:  # (the inverse restores only a double-quantized scale)
        state.absmax = transposed.T.reshape(-1).to(torch.float32)
    module.weight.quant_state = module.quant_state = state


def _matches(name: str, patterns: list[str]) -> bool:
    # transformers' should_convert_module, negated
    return any(re.match(rf"(?:{key}){_BOUNDARY}", name) or name.endswith(key) for key in patterns)


def default_skips(model: nn.Module) -> list[str]:
    """transformers' ``get_keys_to_not_convert``: the output embedding, tied weights, the last parameter's module."""
    skips = ["lm_head"]  # the output embedding; a tied LM head is that same module
    last_parameter = list(model.named_parameters())[-1][0]
    skips.append(last_parameter.rsplit(".", 1)[0])
    return skips


def bnb_module_names(model: nn.Module, config: BitsAndBytesConfig) -> list[str]:
    """The linear layers bitsandbytes replaces, by vlmkit name."""
    skips = default_skips(model) if config.llm_int8_skip_modules is None else list(config.llm_int8_skip_modules)
    return [name for name in plain_linear_names(model)
            if not _matches(name, skips)]


def stored_bnb_module_names(tensor_names: list[str], config: BitsAndBytesConfig) -> list[str]:
    """The layers a transformers-saved bitsandbytes checkpoint holds quantized, from its tensor names."""
    if config.load_in_8bit:
        return sorted(n.removesuffix(".SCB") for n in tensor_names if n.endswith(".SCB"))
    marker = ".weight.quant_state.bitsandbytes__"
    return sorted(n.split(marker)[0] for n in tensor_names if marker in n)


class BitsAndBytesMethod:
    """``take``/``build`` for ``StreamingQuantizer``: quantize with bitsandbytes as weights stream in
    (each in the model's dtype, as transformers does), or read a checkpoint transformers saved quantized."""

    suffixes = frozenset({"weight", "SCB", "weight_format"})

    def __init__(self, config: BitsAndBytesConfig, device: torch.device, dtype: torch.dtype, pre_quantized: bool):
        self.bnb = require_bitsandbytes()
        self.config, self.device, self.dtype, self.pre_quantized = config, device, dtype, pre_quantized

    def take(self, module_name: str, suffix: str, tensor: torch.Tensor):
        if self.pre_quantized:
            return tensor.to(self.device)
        value = tensor.to(dtype=self.dtype)
        if self.config.load_in_8bit:
            return self.bnb.nn.Int8Params(value.to("cpu"), requires_grad=False,
                                          has_fp16_weights=self.config.llm_int8_has_fp16_weight).to(self.device)
        return self.bnb.nn.Params4bit(value, requires_grad=False,
                                      compress_statistics=self.config.bnb_4bit_use_double_quant,
                                      quant_type=self.config.bnb_4bit_quant_type,
                                      quant_storage=self.config.bnb_4bit_quant_storage).to(self.device)

    def build(self, linear: nn.Linear, taken: dict) -> nn.Module:
        bnb, config = self.bnb, self.config
        with torch.device("meta"):
            if config.load_in_8bit:
                module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                             has_fp16_weights=config.llm_int8_has_fp16_weight,
                                             threshold=config.llm_int8_threshold)
            else:
                module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                           config.bnb_4bit_compute_dtype,
                                           compress_statistics=config.bnb_4bit_use_double_quant,
                                           quant_type=config.bnb_4bit_quant_type,
                                           quant_storage=config.bnb_4bit_quant_storage)
        module.weight = self._weight(module, taken)
        if config.load_in_4bit:
            module.weight.module = module
            module.quant_state = module.weight.quant_state
            keep_packable_for_cpu(module)
            module.register_state_dict_pre_hook(unpack_before_saving)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module.requires_grad_(False)

    def _weight(self, module: nn.Module, taken: dict):
        if not self.pre_quantized:
            return taken["weight"]
        if self.config.load_in_8bit:
            if "SCB" not in taken:
                raise InputError("an 8-bit bitsandbytes layer without its SCB scales in the checkpoint")
            weight = taken["weight"]
            return self.bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight,
                                          SCB=taken["SCB"])
        stats = {k: v for k, v in taken.items() if k.startswith("weight.")}
        return self.bnb.nn.Params4bit.from_prequantized(data=taken["weight"], quantized_stats=stats,
                                                        requires_grad=False, device=self.device, module=module)
