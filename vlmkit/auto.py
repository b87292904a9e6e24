"""Picking the family from a checkpoint's ``config.json``: ``AutoProcessor`` (and its ``AutoTokenizer`` and
``AutoImageProcessor`` parts), ``AutoConfig``, ``AutoModel`` and ``load``."""

from importlib import import_module

from .errors import CheckpointError, InputError
from .io.checkpoint import LOCATION_OPTIONS, checkpoint_location, read_json

# model_type -> (module, model class, processor class)
FAMILIES = {
    "janus": ("vlmkit.models.janus", "JanusForConditionalGeneration", "JanusProcessor"),
    "multi_modality": ("vlmkit.models.janus", "JanusForConditionalGeneration", "JanusProcessor"),
    "llava_onevision": ("vlmkit.models.llava_onevision", "LlavaOnevisionForConditionalGeneration",
                        "LlavaOnevisionProcessor"),
    "idefics": ("vlmkit.models.idefics", "IdeficsForVisionText2Text", "IdeficsProcessor"),
}


# a processor's saved class name -> its family, for folders that hold a processor without a model
PROCESSOR_FAMILIES = {"JanusProcessor": "janus", "VLChatProcessor": "multi_modality",
                      "LlavaOnevisionProcessor": "llava_onevision", "IdeficsProcessor": "idefics"}


def _processor_class(folder) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            processor_class = read_json(folder / name).get("processor_class")
            if isinstance(processor_class, str) and processor_class:
                return processor_class
    return None


def family_of(name_or_path, **options) -> tuple[str, object, object]:
    """(model_type, model class, processor class) of a checkpoint; ``options``: from_pretrained's
    (``revision``, ``cache_dir``, ``subfolder``... locate it)."""
    folder = checkpoint_location(name_or_path, dict(options))
    if not (folder / "config.json").is_file() and _processor_class(folder) in PROCESSOR_FAMILIES:
        model_type = PROCESSOR_FAMILIES[_processor_class(folder)]  # a folder of processor files only
    else:
        model_type = _model_type(folder)
    module_name, model_name, processor_name = FAMILIES[model_type]
    module = import_module(module_name)
    return model_type, getattr(module, model_name), getattr(module, processor_name)


def _model_type(folder) -> str:
    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type == "multi_modality" and "gen_vision_config" not in config:
        raise CheckpointError(f"{folder} is a DeepSeek multi_modality checkpoint without image-generation sections "
                              "(JanusFlow or DeepSeek-VL v1?); vlmkit supports Janus and Janus-Pro only")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise CheckpointError(f"{folder}: unknown model type {model_type!r}; vlmkit supports "
                              f"{', '.join(sorted(FAMILIES))}")
    return model_type


class AutoProcessor:
    """``AutoProcessor.from_pretrained(path)``: the processor of whatever family the checkpoint is."""

    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        return family_of(name_or_path, **kwargs)[2].from_pretrained(name_or_path, **kwargs)


class AutoConfig:
    """``AutoConfig.from_pretrained(path)``: the checkpoint's config, as its model reads it; keyword
    arguments naming config attributes override them (as transformers')."""

    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        options = dict(kwargs)
        folder = checkpoint_location(name_or_path, options)
        raw = read_json(folder / "config.json")
        config, _ = family_of(folder)[1].config_from_folder(folder, raw)
        unknown = sorted(k for k in options if not hasattr(config, k))
        if unknown:
            raise InputError(f"AutoConfig.from_pretrained got {', '.join(unknown)}, which the "
                             f"{type(config).__name__} has no attribute of")
        for key, value in options.items():
            setattr(config, key, value)
        config.architectures, config._name_or_path = raw.get("architectures"), str(name_or_path)
        return config


class AutoModel:
    """``AutoModel.from_pretrained(path, dtype=..., device_map=...)`` for any supported family."""

    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        return family_of(name_or_path, **kwargs)[1].from_pretrained(name_or_path, **kwargs)


AutoModelForImageTextToText = AutoModel
AutoModelForVision2Seq = AutoModel


class AutoTokenizer:
    """``AutoTokenizer.from_pretrained(path)``: the checkpoint's tokenizer (the one its processor holds)."""

    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        return AutoProcessor.from_pretrained(name_or_path, **kwargs).tokenizer


class AutoImageProcessor:
    """``AutoImageProcessor.from_pretrained(path)``: the checkpoint's image processor (its processor's)."""

    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        return AutoProcessor.from_pretrained(name_or_path, **kwargs).image_processor


def load(name_or_path, **kwargs):
    """(model, processor) for a checkpoint folder or cached hub id."""
    # the processor is read from the very folder the model is (same revision, cache, subfolder)
    location = {key: kwargs[key] for key in LOCATION_OPTIONS if key in kwargs}
    return AutoModel.from_pretrained(name_or_path, **kwargs), AutoProcessor.from_pretrained(name_or_path, **location)
