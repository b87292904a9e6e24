"""Normalisation layers shared by every family."""

import torch
from torch import nn

from .cpu_kernels import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the LLaMA/Qwen2 references, then cast back."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = rms_norm(hidden_states, self.weight, self.eps)  # many bf16 rows on a CPU: one C++ pass
        if fused is not None:
            return fused
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(input_dtype)
