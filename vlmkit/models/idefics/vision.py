"""IDEFICS's CLIP vision tower: patches plus a class token and learned positions, a pre-LayerNorm,
then the shared pre-norm ViT encoder. Cross-attention reads the encoder's last hidden state of every
position (class token included); CLIP's post-LayerNorm only serves the pooled output, which IDEFICS
never uses, so it is not built (its checkpoint weights are skipped when loading)."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import InputError
from ...nn.vit import VisionEncoder
from .config import IdeficsVisionConfig


class IdeficsVisionEmbeddings(nn.Module):
    """Conv patchify (no bias), a learned class token in front, absolute position embeddings."""

    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(config.embed_dim))  # random until a checkpoint fills it
        self.patch_embedding = nn.Conv2d(config.num_channels, config.embed_dim, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.embed_dim)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height, width) != (self.image_size, self.image_size):
            raise InputError(f"images are {height}x{width} but the vision tower takes {self.image_size}x"
                             f"{self.image_size}; use the processor, or pass interpolate_pos_encoding=True")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        embeddings = torch.cat([self.class_embedding.expand(batch, 1, -1), patches], dim=1)
        positions = self.position_embedding.weight[None]
        if interpolate_pos_encoding:
            positions = self.interpolated_positions(positions, height, width)
        return embeddings + positions

    def interpolated_positions(self, positions: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings resized (bicubic) to a ``height`` x ``width`` image's patch grid."""
        num_positions = positions.shape[1] - 1
        rows, cols = height // self.patch_size, width // self.patch_size
        if rows * cols == num_positions and height == width:
            return positions
        side = math.sqrt(num_positions)
        grid = positions[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        dtype = grid.dtype
        # the reference resizes by a scale factor with 0.1 added against float error (DINO's trick)
        # and in float32 for bfloat16, which bicubic interpolation lacks
        grid = F.interpolate(grid.float() if dtype == torch.bfloat16 else grid,
                             scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic",
                             align_corners=False).to(dtype)
        if grid.shape[-2:] != (rows, cols):
            raise InputError(f"cannot interpolate position embeddings to a {rows}x{cols} patch grid")
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([positions[:, :1], grid], dim=1)


class IdeficsVisionTransformer(nn.Module):
    """Pixels [N, 3, H, W] -> patch features [N, 1 + patches, embed_dim] (the last hidden state)."""

    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.embeddings = IdeficsVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)  # CLIP's spelling, kept
        self.encoder = VisionEncoder(config.num_hidden_layers, hidden_size=config.embed_dim,
                                     num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                                     activation=config.hidden_act, eps=config.layer_norm_eps)
        # CLIP's norm of the pooled output: IDEFICS reads the last hidden state and never applies it, but the
        # weights are part of the checkpoint and of transformers' state_dict
        self.post_layernorm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        return self.encoder(self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding)))
