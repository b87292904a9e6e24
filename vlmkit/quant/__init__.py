"""Quantized weights: transformers' bitsandbytes 8-bit/4-bit path (``BitsAndBytesConfig``, bnb.py) and
vlmkit's own weight-only int8/int4 (weight_only.py), both applied while ``from_pretrained`` streams
the checkpoint (loading.py). ``quantizer_for`` is what ``from_pretrained`` calls; the attention-kernel
choice lives in nn/attention_choice.py and ``save_pretrained`` in io/saving.py."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .config import BitsAndBytesConfig, WeightOnlyConfig, parse_quantization_config, resolve_quantization
from .loading import StreamingQuantizer, checkpoint_tensor_names

__all__ = [
    "BitsAndBytesConfig",
    "WeightOnlyConfig",
    "parse_quantization_config",
    "quantized_modules",
    "quantizer_for",
    "resolve_quantization",
]


def quantizer_for(model: nn.Module, quantization, pre_quantized: bool, files, layout, device: torch.device,
                  dtype: torch.dtype) -> StreamingQuantizer | None:
    """The quantizer for ``model`` (still on the meta device) and a resolved ``quantization``, or None.
    Raises, before any weight is read, when the request cannot be served."""
    if quantization is None:
        return None
    if isinstance(quantization, BitsAndBytesConfig):
        from .bnb import BitsAndBytesMethod, bnb_module_names, stored_bnb_module_names
        if quantization.quantization_method() is None:
            raise InputError("BitsAndBytesConfig asks for neither load_in_8bit=True nor load_in_4bit=True")
        method = BitsAndBytesMethod(quantization, device, dtype, pre_quantized)  # checks bitsandbytes is there
        names = stored_bnb_module_names(checkpoint_tensor_names(files, layout.rename), quantization) \
            if pre_quantized else bnb_module_names(model, quantization)
    else:
        from .weight_only import WeightOnlyMethod, stored_weight_only_module_names, weight_only_module_names
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise InputError(f"int8/int4 models compute in bfloat16, float16 or float32, not {dtype}")
        method = WeightOnlyMethod(quantization, device, dtype, pre_quantized)
        names = stored_weight_only_module_names(checkpoint_tensor_names(files, layout.rename)) \
            if pre_quantized else weight_only_module_names(model)
    return StreamingQuantizer(method, names, files)


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """{module name: class name} of the model's quantized linear layers (bitsandbytes' or vlmkit's)."""
    from .weight_only import QuantizedLinear
    found = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, QuantizedLinear) or kind in ("Linear4bit", "Linear8bitLt"):
            found[name] = kind
    return found
