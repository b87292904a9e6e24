"""``Linear`` and ``Conv2d``: torch's layers, taking vlmkit's bf16 CPU paths where they apply (see
``cpu_kernels``), and ``project``: several linear layers over one input (q/k/v, gate/up) in one call.

Module and parameter names are torch's, so checkpoints load by name and ``state_dict`` is unchanged;
outside bf16 on a CPU they compute exactly what ``nn.Linear``/``nn.Conv2d`` do."""

import torch
from torch import nn

from .cpu_kernels import MIN_KERNEL_WEIGHTS, conv_in_fp32, kernel_linears, linear
from .kernel_build import compiled_kernels


class Linear(nn.Linear):
    """``nn.Linear`` through ``cpu_kernels.linear`` (bf16: the decode kernel, or fp32 compute for many rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes bf16 convolutions in fp32 where torch's bf16 ones are slow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if conv_in_fp32(x, self.weight):
            bias = None if self.bias is None else self.bias.float()
            return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)
        return super().forward(x)


def project(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """Each layer applied to ``x``: in one kernel call when the bf16 decode kernel applies to all of them
    (plain linear layers without hooks), else by calling each layer as usual."""
    if all(isinstance(layer, nn.Linear) and not (layer._forward_hooks or layer._forward_pre_hooks)
           for layer in layers):
        out = kernel_linears(x, [layer.weight for layer in layers], [layer.bias for layer in layers])
        if out is not None:
            return out
    return [layer(x) for layer in layers]


def use_fast_layers(model: nn.Module) -> None:
    """Turn every plain ``nn.Linear``/``nn.Conv2d`` of ``model`` into ``Linear``/``Conv2d`` in place (same
    weights, same names), so family modules built from torch's layers take the bf16 CPU paths too."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
        elif type(module) is nn.Conv2d:
            module.__class__ = Conv2d


def prepare_for_decoding(model: nn.Module) -> None:
    """After loading: torch's layers swapped for vlmkit's, and the decode kernel built now (once per
    machine) rather than at the first token, if the model has bf16 CPU weights it would read."""
    use_fast_layers(model)
    if any(isinstance(m, Linear) and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
           and m.weight.numel() >= MIN_KERNEL_WEIGHTS for m in model.modules()):
        compiled_kernels()
