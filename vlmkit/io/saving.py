"""``save_pretrained``: a checkpoint folder that ``from_pretrained`` loads back as it is, with no need
for the original weights: config.json (with ``quantization_config`` when the model is quantized),
model.safetensors under transformers' tensor names, and the source folder's tokenizer, processor,
chat-template and generation files. Quantized layers are written in their stored forms: bitsandbytes
layers as transformers writes them, vlmkit's int8/int4 in the portable form ``quant/weight_only.py`` names."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from torch import nn

from ..errors import InputError
from .checkpoint import BIN_INDEX, SAFETENSORS_INDEX, read_json

# vlmkit tensor names that differ from the transformers layout, mapped back on saving (the loaders map
# them the other way, and also read these names as they are)
_TRANSFORMERS_NAMES = {
    "JanusForConditionalGeneration": ((re.compile(r"\.self_attn\.out_proj(?=\.|$)"), ".self_attn.projection_layer"),),
    "IdeficsForVisionText2Text": ((re.compile(r"\.vision_model\.pre_layernorm(?=\.|$)"), ".vision_model.pre_layrnorm"),),
}
_WEIGHT_FILES = {"model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX, "config.json"}


def transformers_name(model: nn.Module, name: str) -> str:
    """A vlmkit parameter or module name as the transformers layout spells it."""
    for pattern, replacement in _TRANSFORMERS_NAMES.get(type(model).__name__, ()):
        name = pattern.sub(replacement, name)
    return name


def save_checkpoint(model: nn.Module, directory) -> Path:
    """Write ``model`` (loaded by ``from_pretrained``) into ``directory``; returns the folder."""
    from safetensors.torch import save_file

    source = Path(getattr(model, "folder", "") or ".")
    raw_config = getattr(model, "checkpoint_config", None) or read_json(source / "config.json")
    if raw_config.get("model_type") == "multi_modality":
        raise InputError("save_pretrained writes the transformers layout; this model was loaded from DeepSeek's "
                         "original Janus layout (model_type multi_modality): load a transformers-layout Janus "
                         "checkpoint (deepseek-community/Janus-Pro-*) to save it quantized")
    out = Path(directory)
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise InputError(f"save_pretrained would overwrite the checkpoint the model was loaded from ({source}); "
                         f"pass another folder")
    out.mkdir(parents=True, exist_ok=True)

    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:  # a tied weight (LM head = embedding): the loader ties it again
            continue
        seen.add(key)
        tensors[transformers_name(model, name)] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = dict(raw_config)
    # what dtype="auto" reads back: the dtype the weights were saved in
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]
    quantization = getattr(model, "quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization.to_dict()
    else:
        config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if source.is_dir() and source.resolve() != out.resolve():
        for item in source.iterdir():
            if item.is_file() and item.name not in _WEIGHT_FILES and not item.name.endswith((".safetensors", ".bin")):
                shutil.copy2(item, out / item.name)
    return out
