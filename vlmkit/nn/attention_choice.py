"""``attn_implementation`` / ``use_flash_attention_2``, the other "model optimization" option of the
transformers docs, accepted as transformers accepts them. vlmkit's attention is always torch's
``scaled_dot_product_attention``; the option picks which of its kernels run:

* "flash_attention_2" on CUDA: SDPA's FlashAttention-2 kernel first (torch ships it; the flash-attn
  package is not needed), then memory-efficient attention where flash cannot run (a padding mask,
  float32), then the math kernel;
* "eager": the math kernel (softmax(QK^T)V spelled out, as transformers' eager path);
* "sdpa" or nothing: SDPA's own choice.

On a CPU there is one kernel choice: "flash_attention_2" gives one notice and runs SDPA."""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import InputError
from .attention import DecoderSelfAttention
from .vit import VisionAttention

IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
_BACKENDS = {
    "flash_attention_2": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                          SDPBackend.MATH],
    "eager": [SDPBackend.MATH],
}


def resolve_attn_implementation(attn_implementation: str | None, use_flash_attention_2: bool | None) -> str:
    """The implementation asked for, checked: one of ``IMPLEMENTATIONS`` ("sdpa" when none is named)."""
    if use_flash_attention_2:
        if attn_implementation not in (None, "flash_attention_2"):
            raise InputError(f"use_flash_attention_2=True contradicts attn_implementation={attn_implementation!r}")
        attn_implementation = "flash_attention_2"
    attn_implementation = attn_implementation or "sdpa"
    if attn_implementation not in IMPLEMENTATIONS:
        raise InputError(f"attn_implementation {attn_implementation!r} is not available in vlmkit; choose one of "
                         f"{', '.join(IMPLEMENTATIONS)} (all run torch's scaled_dot_product_attention)")
    return attn_implementation


def apply_attn_implementation(model: nn.Module, implementation: str, device: torch.device,
                              dtype: torch.dtype) -> None:
    """Make ``model``'s attention layers run the SDPA kernels ``implementation`` stands for on ``device``."""
    model.attn_implementation = implementation
    if implementation == "sdpa":
        return
    if device.type != "cuda":
        if implementation == "flash_attention_2":
            warnings.warn("attn_implementation='flash_attention_2' needs a CUDA GPU; on the CPU vlmkit runs torch's "
                          "scaled_dot_product_attention instead", UserWarning, stacklevel=3)
        return
    if implementation == "flash_attention_2" and dtype not in (torch.float16, torch.bfloat16):
        warnings.warn(f"FlashAttention-2 computes in float16/bfloat16, not {dtype}: SDPA picks its memory-efficient "
                      f"kernel instead (load with dtype=torch.bfloat16 for flash)", UserWarning, stacklevel=3)
    for module in model.modules():
        if _uses_sdpa(module):
            module.__class__ = _with_backends(type(module), implementation)


def _uses_sdpa(module: nn.Module) -> bool:
    return type(module) in (DecoderSelfAttention, VisionAttention)


@functools.cache
def _with_backends(cls: type, implementation: str) -> type:
    backends = _BACKENDS[implementation]

    def forward(self, *args, **kwargs):
        with sdpa_kernel(backends, set_priority=True):
            return cls.forward(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward, "__doc__": cls.__doc__,
                                       "__module__": cls.__module__, "sdpa_backends": tuple(backends)})
