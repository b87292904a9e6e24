"""Activation functions by the names checkpoints' configs use."""

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from .cpu_kernels import on_one_thread_if_small


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_fast": partial(F.gelu, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
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
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None
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
