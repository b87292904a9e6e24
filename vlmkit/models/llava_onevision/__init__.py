"""LLaVA-OneVision: anyres images, multi-image prompts and video, text out."""

from .config import LlavaOnevisionConfig, SiglipVisionConfig
from .image_processing import LlavaOnevisionImageProcessor
from .modeling import LlavaOnevisionForConditionalGeneration
from .processing import LlavaOnevisionProcessor

# transformers' name for the video side; here one class preprocesses images and video frames
LlavaOnevisionVideoProcessor = LlavaOnevisionImageProcessor

__all__ = ["LlavaOnevisionConfig", "SiglipVisionConfig", "LlavaOnevisionImageProcessor",
           "LlavaOnevisionVideoProcessor", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor"]
