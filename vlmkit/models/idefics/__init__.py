"""IDEFICS (HuggingFaceM4/idefics-9b, -instruct): interleaved image-text prompts, gated cross-attention."""

from .config import IdeficsConfig, IdeficsPerceiverConfig, IdeficsVisionConfig
from .image_processing import IdeficsImageProcessor
from .modeling import IdeficsForVisionText2Text, IdeficsModel
from .processing import IdeficsProcessor

__all__ = ["IdeficsConfig", "IdeficsPerceiverConfig", "IdeficsVisionConfig", "IdeficsForVisionText2Text",
           "IdeficsModel", "IdeficsProcessor", "IdeficsImageProcessor"]
