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

from ..configs import with_edits
from ..errors import InputError
from .chat_template import processor_chat_template
from .checkpoint import BIN_INDEX, SAFETENSORS_INDEX, read_json
from .pixels import IMAGE_SETTINGS
from .tokenizer_classes import config_model_type

_WEIGHT_FILES = {"model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX, "config.json"}


def save_checkpoint(model: nn.Module, directory, max_shard_size="5GB", **options) -> Path:
    """Write ``model`` (loaded by ``from_pretrained``) into ``directory``; returns the folder. Weights over
    ``max_shard_size`` (bytes, or "500MB", "5GB" as transformers writes it) go into shards with an index;
    weight files a previous save left in the folder are removed first, so the index cannot name stale ones."""
    from safetensors.torch import save_file

    _refuse_save_options(options)
    shard_bytes = parse_size(max_shard_size)

    folder = getattr(model, "folder", None)
    source = Path(folder) if folder else None  # None: built from a config (``ModelClass(config)``), no files
    raw_config = getattr(model, "checkpoint_config", None) or (
        read_json(source / "config.json") if source is not None else
        {**model.config.to_dict(), "architectures": [type(model).__name__]})
    if raw_config.get("model_type") == "multi_modality":
        raise InputError("save_pretrained writes the transformers layout; this model was loaded from DeepSeek's "
                         "original Janus layout (model_type multi_modality), which it cannot write back: load a "
                         "transformers-layout Janus checkpoint (deepseek-community/Janus-Pro-*) to save one")
    out = Path(directory)
    if source is not None and out.exists() and source.exists() and out.resolve() == source.resolve():
        raise InputError(f"save_pretrained would overwrite the checkpoint the model was loaded from ({source}); "
                         f"pass another folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file() and _STALE_WEIGHTS.fullmatch(stale.name):
            stale.unlink()

    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:  # a tied weight (LM head = embedding): the loader ties it again
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    shards = _shards(tensors, shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    config = dict(raw_config)
    if getattr(model, "config_at_load", None) is not None:  # edits made to model.config since loading
        config = with_edits(raw_config, model.config_at_load, model.config.to_dict())
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
    if source is not None and source.is_dir():  # a processor saved there first keeps its files (and edits in them)
        _copy_side_files(source, out, overwrite=False)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:  # as the model holds it now, edits included
        generation_config.save_pretrained(out)
    return out


def save_processor_files(processor, directory, **options) -> Path:
    """Write a processor's files into ``directory``: those of the folder it was loaded from (tokenizer,
    chat template, image and video processor configs), with tokenizer_config.json carrying the tokenizer's
    current padding side, truncation side and length limit."""
    _refuse_save_options(options)
    tokenizer = processor.tokenizer
    if tokenizer.folder is None:
        raise InputError("this processor's tokenizer was not loaded from a folder, so there are no files to save")
    source, out = Path(tokenizer.folder), Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _copy_side_files(source, out, also_skip=("generation_config.json", "tokenizer.json", "tokenizer_config.json"))
    if config_model_type(source) == "multi_modality":  # the folder's layout is told by config.json: without it
        shutil.copy2(source / "config.json", out / "config.json")  # DeepSeek's files read as transformers'
    config = save_tokenizer_files(tokenizer, out)  # the tokenizer as it is now
    template = getattr(processor, "chat_template", None)
    processor_config = out / "processor_config.json"
    found = processor_chat_template(out, read_json(processor_config) if processor_config.is_file() else {}, config)
    if template and template != found:  # set or edited since loading: the file processors read, alone
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        (out / "chat_template.json").unlink(missing_ok=True)  # a copied older file would be read before it
        if processor_config.is_file() and "chat_template" in read_json(processor_config):
            values = read_json(processor_config)
            del values["chat_template"]
            processor_config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _write_setting_edits(processor, out)
    return out


# image processor settings written back when edited: every family's, and the families' own ones
_SAVED_IMAGE_SETTINGS = IMAGE_SETTINGS | {"do_convert_rgb", "min_size", "image_grid_pinpoints"}


def _write_setting_edits(processor, out: Path) -> None:
    """Settings changed since loading (``processor.use_default_system_prompt = True``,
    ``processor.image_processor.image_mean = [...]``) written into the copied files where ``from_pretrained``
    (vlmkit's and transformers') reads them: processor_config.json, and the image and video processors'
    sections of it or their own files."""
    processor_file = out / "processor_config.json"
    values = read_json(processor_file) if processor_file.is_file() else {}
    edited = {key: getattr(processor, key) for key in processor.own_settings
              if _plain(getattr(processor, key, None)) and values.get(key) != getattr(processor, key)}
    sections = (("image_processor", "preprocessor_config.json"), ("video_processor", "video_preprocessor_config.json"))
    for attribute, file_name in sections:
        settings = getattr(processor, attribute, None)
        if settings is None or (attribute == "video_processor" and settings is processor.image_processor):
            continue
        if isinstance(values.get(attribute), dict):  # transformers 5: one file, a section per part
            values[attribute] = _with_image_edits(settings, values[attribute])
        elif (out / file_name).is_file():
            config = read_json(out / file_name)
            updated = _with_image_edits(settings, config)
            if updated != config:
                (out / file_name).write_text(json.dumps(updated, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if edited or values != (read_json(processor_file) if processor_file.is_file() else {}):
        processor_file.write_text(json.dumps({**values, **edited}, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _with_image_edits(image_processor, config: dict) -> dict:
    """``config`` (an image processor's file) with the settings ``image_processor`` holds that differ from
    what that file gives."""
    loaded = type(image_processor).from_config(config)
    updated = dict(config)
    for name in _SAVED_IMAGE_SETTINGS:
        value, before = getattr(image_processor, name, None), getattr(loaded, name, None)
        if value is None or value == before:
            continue
        if name == "size" and isinstance(value, int) and isinstance(config.get("size"), dict):
            value = {key: value for key in config["size"]} if set(config["size"]) <= {"height", "width"} else None
        value = int(value) if name == "resample" else list(value) if isinstance(value, tuple) else value
        if _plain(value):
            updated[name] = value
    return updated


def _plain(value) -> bool:
    """Whether ``value`` is written as JSON as it is (not a tensor, an enum or an object)."""
    if isinstance(value, (list, tuple)):
        return all(map(_plain, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return isinstance(value, (str, int, float, bool)) and type(value) in (str, int, float, bool)


def save_tokenizer_files(tokenizer, out: Path) -> dict:
    """Write the tokenizer as it is now: tokenizer.json (added tokens included) and tokenizer_config.json
    carrying its special tokens, added tokens, padding side, truncation side and length limit; returns the
    config written."""
    tokenizer.backend.save(str(out / "tokenizer.json"), pretty=True)
    config = dict(tokenizer.config)
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):  # a copy: writing the file leaves the tokenizer's own config as it is
        extra = config["extra_special_tokens"] = dict(extra)
    for key, token in tokenizer.special_tokens.items():
        if isinstance(extra, dict) and key in extra:
            extra[key] = token
        else:
            config[key] = token
    config["added_tokens_decoder"] = {
        str(index): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
        for index, t in tokenizer.added_tokens_decoder.items()}
    config.update(padding_side=tokenizer.padding_side, truncation_side=tokenizer.truncation_side)
    if tokenizer.known_max_length is not None:
        config["model_max_length"] = tokenizer.model_max_length
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    return config


def _copy_side_files(source: Path, out: Path, also_skip: tuple[str, ...] = (), overwrite: bool = True) -> None:
    """Copy the files beside a checkpoint's weights and config (tokenizer, processor configs, chat template...)
    from ``source`` into ``out`` (with ``overwrite`` false, only those ``out`` lacks); nothing when they are
    the same folder."""
    if source.resolve() == out.resolve():
        return
    for item in source.iterdir():
        if item.is_file() and item.name not in _WEIGHT_FILES and item.name not in also_skip \
                and not item.name.endswith((".safetensors", ".bin")) and (overwrite or not (out / item.name).exists()):
            shutil.copy2(item, out / item.name)


# weight files save_pretrained replaces: a folder saved into again must not keep another save's shards
_STALE_WEIGHTS = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                            r"pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json")
# save_pretrained options of transformers that vlmkit has at these values only (None: any value)
_SAVE_OPTIONS = {"safe_serialization": (True, False), "push_to_hub": (False,), "state_dict": (None,), "variant": (None,),
                 "is_main_process": (True,), "save_function": None, "token": None, "save_peft_format": None}


def _refuse_save_options(options: dict) -> None:
    refused = sorted(k for k, v in options.items()
                     if k not in _SAVE_OPTIONS or (_SAVE_OPTIONS[k] is not None and v not in _SAVE_OPTIONS[k]))
    if refused:
        raise InputError(f"save_pretrained got option(s) vlmkit does not support: "
                         f"{', '.join(f'{k}={options[k]!r}' for k in refused)} (vlmkit writes safetensors into a "
                         f"local folder, never to the hub)")


def parse_size(size) -> int:
    """Bytes from an int or a string such as "500MB", "5GB", "2GiB" (transformers' max_shard_size)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", str(size), re.IGNORECASE)
    if not match:
        raise InputError(f"max_shard_size={size!r}: give bytes or a size such as '500MB' or '5GB'")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    scale = (1024 if binary else 1000) ** "_KMGT".index(unit or "_")
    return max(int(number * scale), 1)


def _shards(tensors: dict, limit: int) -> list[dict]:
    """The tensors in name order, cut into shards of at most ``limit`` bytes (a larger tensor alone)."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return shards + [current] if current or not shards else shards
