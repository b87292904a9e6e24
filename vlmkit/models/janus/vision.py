"""Janus's understanding tower: a SigLIP ViT (patches + positions, encoder, final LayerNorm) whose
patch features the aligner maps into the LM."""

import torch
from torch import nn

from ...nn.vit import PatchEmbedding, VisionEncoder
from .config import JanusVisionConfig


class JanusVisionModel(nn.Module):
    """SigLIP ViT: patches + positions, encoder, final LayerNorm (no attention pooling)."""

    def __init__(self, config: JanusVisionConfig):
        super().__init__()
        self.embeddings = PatchEmbedding(config.num_channels, config.hidden_size, config.patch_size,
                                         config.image_size)
        self.encoder = VisionEncoder(config.num_hidden_layers, hidden_size=config.hidden_size,
                                     num_heads=config.num_attention_heads,
                                     intermediate_size=config.intermediate_size, activation=config.hidden_act,
                                     eps=config.layer_norm_eps, qkv_bias=config.attention_bias)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
