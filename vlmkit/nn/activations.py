"""Activation functions by the names checkpoints' configs use."""

import math
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError
from .cpu_kernels import on_one_thread_if_small


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def clipped_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU clipped to [-10, 10] (transformers' "gelu_10", for quantization-friendly ranges)."""
    return torch.clip(F.gelu(x), -10, 10)


def laplace(x: torch.Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> torch.Tensor:
    """The Laplace-CDF activation transformers' "laplace" names (MEGA), with its constants."""
    return 0.5 * (1.0 + torch.erf((x - mu).div(sigma * math.sqrt(2.0))))


# transformers' ACT2FN names (those without weights of their own), each computing what transformers' does
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_python_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_fast": partial(F.gelu, approximate="tanh"),
    "gelu_accurate": partial(F.gelu, approximate="tanh"),
    "gelu_10": clipped_gelu,
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "relu2": relu_squared,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "laplace": laplace,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": nn.Identity(),
}


# At most this many values (a decode step's rows) go through an activation on one thread.
FEW_VALUES = 1 << 16


def get_activation(name: str):
    """The activation function a config names, e.g. ``"silu"`` or ``"gelu_pytorch_tanh"``; a decode step's
    few values on one thread (torch's GELU starts oneDNN's OpenMP team for any size, which then spins on
    the cores of the next decode kernel: Janus' image head and aligner, twice a CFG step)."""
    try:
        function = _ACTIVATIONS[name]
    except KeyError:
        raise CheckpointError(f"the config names the activation {name!r}, which vlmkit does not compute; it computes "
                              f"{', '.join(sorted(_ACTIVATIONS))}") from None
    return _ON_ONE_THREAD_IF_SMALL.setdefault(function, partial(_on_one_thread_if_small, function))


def _on_one_thread_if_small(function, x: torch.Tensor) -> torch.Tensor:
    with on_one_thread_if_small(x, FEW_VALUES):
        return function(x)


_ON_ONE_THREAD_IF_SMALL: dict = {}  # one wrapper per function, so the same name gives the same object


class Activation(nn.Module):
    """An activation as a module, so it can sit in a Sequential."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = get_activation(name)

    def forward(self, x):
        return self.fn(x)
