"""Feed-forward blocks: the gated (SwiGLU) MLP of LLaMA-style decoders and the two-layer MLP of ViTs."""

from torch import nn

from .activations import get_activation
from .layers import Linear, project


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), LLaMA/Qwen2's feed-forward."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(activation)

    def forward(self, x):
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(self.act(gate) * up)


class TwoLayerMLP(nn.Module):
    """fc2(act(fc1(x))), the ViT feed-forward."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.fc1 = Linear(hidden_size, intermediate_size)
        self.fc2 = Linear(intermediate_size, hidden_size)
        self.act = get_activation(activation)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
