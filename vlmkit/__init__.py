"""vlmkit: a from-scratch PyTorch engine for vision-language models (Janus, LLaVA-OneVision, IDEFICS).

The classes mirror transformers' names, so the usual examples run with only the import changed;
families (and torch) load lazily, on first use."""

from importlib import import_module

from .errors import CheckpointError, InputError, MediaError, TemplateError, VlmkitError

__version__ = "0.1.0"

# Every name below imports torch with its module, on first use: ``vlmkit --help`` and the CLI's own checks
# answer without it (and a Ctrl-C while torch loads is the CLI's, not an import's traceback).
_LAZY = {
    **dict.fromkeys(["AutoConfig", "AutoImageProcessor", "AutoModel", "AutoModelForImageTextToText",
                     "AutoModelForVision2Seq", "AutoProcessor", "AutoTokenizer", "load"], "vlmkit.auto"),
    "GenerationConfig": "vlmkit.generation.config",
    "TextStreamer": "vlmkit.generation.streaming",
    "TextIteratorStreamer": "vlmkit.generation.streaming",
    "JanusForConditionalGeneration": "vlmkit.models.janus",
    "JanusProcessor": "vlmkit.models.janus",
    "JanusImageProcessor": "vlmkit.models.janus",
    "JanusConfig": "vlmkit.models.janus",
    "JanusVisionConfig": "vlmkit.models.janus",
    "JanusVQVAEConfig": "vlmkit.models.janus",
    "LlavaOnevisionForConditionalGeneration": "vlmkit.models.llava_onevision",
    "LlavaOnevisionProcessor": "vlmkit.models.llava_onevision",
    "LlavaOnevisionImageProcessor": "vlmkit.models.llava_onevision",
    "LlavaOnevisionConfig": "vlmkit.models.llava_onevision",
    "SiglipVisionConfig": "vlmkit.models.llava_onevision",
    "IdeficsForVisionText2Text": "vlmkit.models.idefics",
    "IdeficsProcessor": "vlmkit.models.idefics",
    "IdeficsImageProcessor": "vlmkit.models.idefics",
    "IdeficsModel": "vlmkit.models.idefics",
    "IdeficsConfig": "vlmkit.models.idefics",
    "IdeficsVisionConfig": "vlmkit.models.idefics",
    "IdeficsPerceiverConfig": "vlmkit.models.idefics",
    # the text decoder's config, with the defaults of transformers' class of that name
    "LlamaConfig": "vlmkit.nn.decoder",
    "Qwen2Config": "vlmkit.nn.decoder",
    "BitsAndBytesConfig": "vlmkit.quant",
    "LLM": "vlmkit.batch.offline",
    "SamplingParams": "vlmkit.batch.offline",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")


__all__ = ["AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoProcessor", "AutoTokenizer",
           "AutoImageProcessor", "load",
           "GenerationConfig", "TextStreamer", "TextIteratorStreamer", "VlmkitError", "CheckpointError",
           "InputError", "MediaError", "TemplateError", *_LAZY]
