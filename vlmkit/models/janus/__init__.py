"""Janus / Janus-Pro: image understanding and text-to-image generation."""

from .config import JanusConfig, JanusVisionConfig, JanusVQVAEConfig
from .image_processing import JanusImageProcessor
from .modeling import JanusForConditionalGeneration
from .processing import JanusProcessor

__all__ = ["JanusConfig", "JanusVisionConfig", "JanusVQVAEConfig", "JanusImageProcessor",
           "JanusForConditionalGeneration", "JanusProcessor"]
