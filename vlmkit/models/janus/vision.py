"""Janus's understanding tower: a SigLIP ViT (patches + positions, encoder, final LayerNorm) whose
patch features the aligner maps into the LM."""

import torch

from ...errors import CheckpointError
from ...nn.vit import SiglipViT
from .config import JanusVisionConfig


class JanusVisionModel(SiglipViT):
    """SigLIP ViT whose output (after the final LayerNorm, no attention pooling) is the image features."""

    def __init__(self, config: JanusVisionConfig):
        super().__init__(config, qkv_bias=config.attention_bias, qk_norm=config.use_qk_norm,
                         attention_output_name="projection_layer")
        self.config = config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        config = self.config
        if config.use_qk_norm and config.num_attention_heads > 1:
            # transformers' JanusVisionAttention applies its LayerNorm(hidden_size) to each head's head_dim
            # values, which only fits one head (transformers raises there too): no reference to match
            raise CheckpointError(f"this checkpoint's vision tower has use_qk_norm with {config.num_attention_heads} "
                                  "attention heads, which transformers' Janus cannot run either (its q/k LayerNorm "
                                  "spans hidden_size, one head's width); it reads images only with "
                                  "num_attention_heads 1. Text and image generation work without the tower")
        return super().forward(pixel_values)
