"""The pre-norm ViT encoder shared by the SigLIP (Janus, LLaVA-OneVision) and CLIP (IDEFICS) towers, and
the SigLIP tower itself."""

import torch
from torch import nn
from torch.nn import functional as F

from .cpu_kernels import prefill_attention
from .layers import Conv2d, Linear
from .mlp import TwoLayerMLP


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over patches. ``qk_norm``: queries and keys pass a LayerNorm of the
    full width (default eps) before attention, as transformers' JanusVisionAttention (``use_qk_norm``).
    ``output_name`` names the output projection as the family's transformers model does (Janus:
    ``projection_layer``), so ``state_dict`` and module paths are transformers' own."""

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 output_name: str = "out_proj"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.k_proj = Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.v_proj = Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.output_name = output_name
        setattr(self, output_name, Linear(hidden_size, hidden_size))
        self.q_norm = nn.LayerNorm(hidden_size) if qk_norm else None
        self.k_norm = nn.LayerNorm(hidden_size) if qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = x.shape

        def heads(t):
            return t.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        q, k = self.q_proj(x), self.k_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = heads(q), heads(k), heads(self.v_proj(x))
        out = prefill_attention(q, k, v, None, False)  # vlmkit's kernel where it runs (AVX-512 BF16 CPUs)
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v)
        return getattr(self, self.output_name)(out.transpose(1, 2).reshape(batch, seq_len, hidden))


class VisionEncoderLayer(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, activation: str,
                 eps: float, qkv_bias: bool = True, qk_norm: bool = False, attention_output_name: str = "out_proj"):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = VisionAttention(hidden_size, num_heads, qkv_bias, qk_norm, attention_output_name)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = TwoLayerMLP(hidden_size, intermediate_size, activation)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """A stack of ViT layers; can stop early for towers whose features come from an inner layer."""

    def __init__(self, num_layers: int, **layer_args):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(**layer_args) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        for layer in self.layers[:num_layers]:
            x = layer(x)
        return x


class PatchEmbedding(nn.Module):
    """Conv patchify plus learned absolute positions (SigLIP style, no class token)."""

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int, image_size: int):
        super().__init__()
        self.patch_embedding = Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.num_patches = (image_size // patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches, hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipViT(nn.Module):
    """SigLIP's ViT: patches + learned positions, the encoder, a final LayerNorm (no attention pooling).
    ``config`` is a vision config with SigLIP's key names (``hidden_size``, ``patch_size``...); the module
    names are transformers', so checkpoints load by name."""

    def __init__(self, config, qkv_bias: bool = True, qk_norm: bool = False, attention_output_name: str = "out_proj"):
        super().__init__()
        self.embeddings = PatchEmbedding(config.num_channels, config.hidden_size, config.patch_size,
                                         config.image_size)
        self.encoder = VisionEncoder(config.num_hidden_layers, hidden_size=config.hidden_size,
                                     num_heads=config.num_attention_heads,
                                     intermediate_size=config.intermediate_size, activation=config.hidden_act,
                                     eps=config.layer_norm_eps, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                     attention_output_name=attention_output_name)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features [B, num_patches, hidden] after the final LayerNorm."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
