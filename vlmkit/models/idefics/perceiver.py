"""The perceiver resampler (Flamingo): a fixed set of learned latents cross-attends to an image's patch
features, compressing any number of patches to ``resampler_n_latents`` vectors of the tower's width."""

import torch
from torch import nn
from torch.nn import functional as F

from .config import IdeficsConfig


class PerceiverAttention(nn.Module):
    """Latents attend to [context; latents] (Flamingo concatenates them for the keys and values)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, qk_layer_norms: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.context_layer_norm = nn.LayerNorm(embed_dim)
        self.latents_layer_norm = nn.LayerNorm(embed_dim)
        # per-head LayerNorms (with bias), unlike the decoder's RMS q/k norms
        self.q_layer_norm = nn.LayerNorm(head_dim) if qk_layer_norms else None
        self.k_layer_norm = nn.LayerNorm(head_dim) if qk_layer_norms else None
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False)
        self.output_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)
        keys_input = torch.cat([context, latents], dim=-2)

        def heads(x):
            return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(latents)), heads(self.k_proj(keys_input)), heads(self.v_proj(keys_input))
        if self.q_layer_norm is not None:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        # written out as the reference computes it (scaled queries, max-subtracted softmax in the model's
        # dtype) rather than with SDPA: in bfloat16 the two round differently
        scores = (q * self.head_dim ** -0.5) @ k.transpose(-1, -2)
        weights = (scores - scores.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = weights @ v
        return self.output_proj(out.transpose(1, 2).flatten(-2))


class PerceiverMLP(nn.Module):
    """LayerNorm, then fc -> ReLU -> c_proj (no biases)."""

    def __init__(self, embed_dim: int, intermediate_size: int):
        super().__init__()
        self.ln = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, intermediate_size, bias=False)
        self.c_proj = nn.Linear(intermediate_size, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.fc(self.ln(x))))


class PerceiverResampler(nn.Module):
    """Image features [N, patches, D] -> [N, n_latents, D]."""

    def __init__(self, config: IdeficsConfig):
        super().__init__()
        perceiver, width = config.perceiver_config, config.vision_config.embed_dim
        self.latents = nn.Parameter(torch.randn(perceiver.resampler_n_latents, width))  # random until loaded
        # each block is an (attention, mlp) pair indexed 0/1, the checkpoint's names
        self.blocks = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, perceiver.resampler_n_heads, perceiver.resampler_head_dim,
                                              perceiver.qk_layer_norms_perceiver),
                           PerceiverMLP(width, 4 * width)])
            for _ in range(perceiver.resampler_depth))
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(context.shape[0], -1, -1)
        for attention, mlp in self.blocks:
            latents = attention(context, latents) + latents
            latents = mlp(latents) + latents
        return self.layer_norm(latents)
