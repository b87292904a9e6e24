"""Janus's understanding tower: a SigLIP ViT (patches + positions, encoder, final LayerNorm) whose
patch features the aligner maps into the LM."""

from ...nn.vit import SiglipViT
from .config import JanusVisionConfig


class JanusVisionModel(SiglipViT):
    """SigLIP ViT whose output (after the final LayerNorm, no attention pooling) is the image features."""

    def __init__(self, config: JanusVisionConfig):
        super().__init__(config, qkv_bias=config.attention_bias)
