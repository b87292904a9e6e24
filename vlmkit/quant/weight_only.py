"""vlmkit's own weight-only quantization: ``Int8Linear`` (symmetric, one scale per output channel) and
``Int4Linear`` (asymmetric, a scale and a zero point per group of input channels), computed by torch's
packed-weight matmul ops, and ``WeightOnlyMethod``, which decides the layers and builds them at load.

Decoding one token reads every weight once, so at batch 1 its speed is how fast the weights stream
from memory: one byte per weight (int8) or half a byte (int4) instead of two (bf16). Weights are packed
once, at load, into the layout the kernel wants: ``torch._weight_int8pack_mm`` takes int8 [out, in] as
it is; ``torch._weight_int4pack_mm_for_cpu`` (CPU) and ``torch._weight_int4pack_mm`` (CUDA) each want
their own packing of the 4-bit values. ``state_dict`` holds the portable form every device repacks:
int8 ``weight`` + ``weight_scale`` [out]; int4 ``weight`` uint8 [out, in / 2] (two values per byte,
high nibble first), ``weight_scale`` and ``weight_zero`` [out, in / group], w = (q - 8) * scale + zero
(torch's int4 rule).

Activations stay in the model's dtype. On x86 CPUs without AVX-512 torch's packed kernels are
compute-bound: with bfloat16 activations they stream 3-5 GB/s per core (int8 a little slower than
vlmkit's bf16 decode kernel per byte, so a decode step takes about as long as in bf16: the gain there is
memory, half or a third), and with float32 activations they are scalar and slow: quantized CPU models
should run in bfloat16 (the checkpoints' own dtype)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from ..nn.cpu_kernels import linear_int8
from .config import WeightOnlyConfig
from .loading import plain_linear_names

# Above this many activation rows (prefill, vision towers) torch's int8 kernel falls behind widening the
# weight once per call and running the float GEMM (2048x5632 on 2 AVX2 cores: the kernel wins up to
# about a hundred rows and takes nearly twice as long at 600). The int4 kernel always runs: reading its
# packing back costs more than the kernel loses.
MAX_INT8_PACKED_ROWS = 128
# Layers that only ever see image features (computed once per image, from hundreds of patches at once)
# are quantized to int8 in int4 models too: 4 bits would buy them no speed and cost accuracy.
VISION_SIDE = ("model.vision_model.", "model.vision_tower.", "model.aligner.", "model.multi_modal_projector.",
               "model.perceiver_resampler.")


def _row_blocks(weight: torch.Tensor):
    # a few MB of float32 at a time: quantizing a 100k-row LM head must not hold several float copies of it
    rows = max(1, (1 << 21) // weight.shape[1])
    return (weight[start:start + rows].float() for start in range(0, weight.shape[0], rows))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest per output channel: (int8 [out, in], fp32 scale [out])."""
    values, scales = [], []
    for block in _row_blocks(weight):
        scale = (block.abs().amax(dim=1) / 127).clamp(min=1e-12)
        values.append(torch.round(block / scale[:, None]).clamp(-127, 127).to(torch.int8))
        scales.append(scale)
    return torch.cat(values), torch.cat(scales)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest in groups of ``group_size`` inputs: (values 0..15 as uint8 [out, in],
    fp32 scale and zero [out, in / group]) with w ~ (q - 8) * scale + zero."""
    values, scales, zeros = [], [], []
    for block in _row_blocks(weight):
        groups = block.reshape(block.shape[0], -1, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        values.append(q.reshape(block.shape).to(torch.uint8))
        scales.append(scale)
        zeros.append(low + 8 * scale)
    return torch.cat(values), torch.cat(scales), torch.cat(zeros)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] of 0..15 -> [out, in / 2], high nibble first (what the CUDA packer takes)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    data = packed.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return torch.stack([data >> 4, data & 15], dim=-1).reshape(-1)


@functools.lru_cache(maxsize=8)  # a block of rows of each input width, and the last, shorter blocks
def _cpu_int4_positions(out_features: int, in_features: int) -> torch.Tensor:
    """Where torch's CPU int4 packing puts each weight: for every nibble of the packed tensor, the flat
    index of the weight it holds. torch does not document the layout (it differs between CPU kernels),
    so it is read off the packer: pack the indices themselves, four bits at a time."""
    index = torch.arange(out_features * in_features, dtype=torch.int32)
    positions = torch.zeros_like(index)
    for shift in range(0, max(1, (index.numel() - 1).bit_length()), 4):
        digits = ((index >> shift) & 15).reshape(out_features, in_features)
        positions |= _nibbles(torch._convert_weight_to_int4pack_for_cpu(digits, 1)) << shift
    return positions


def _block_rows(in_features: int) -> int:
    # both int4 packers lay rows out in independent blocks (of at most 64 rows): packing a few MB of rows
    # at a time gives the same tensor, without the CPU packer's int32 copy of a whole LM head
    return 64 * max(1, (1 << 22) // (64 * in_features))


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """The device's int4 kernel packing of values 0..15 [out, in], a block of rows at a time."""
    rows = _block_rows(q.shape[1])
    if q.device.type == "cuda":
        return torch.cat([torch._convert_weight_to_int4pack(pack_nibbles(q[i:i + rows]), 8)
                          for i in range(0, q.shape[0], rows)])
    return torch.cat([torch._convert_weight_to_int4pack_for_cpu(q[i:i + rows].to(torch.int32), 1)
                      for i in range(0, q.shape[0], rows)])


class QuantizedLinear(nn.Module):
    """What ``Int8Linear`` and ``Int4Linear`` share: sizes, the bias, the many-rows float path."""

    bits = 0

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized_weight(self, dtype=torch.float32, outputs: slice = slice(None)) -> torch.Tensor:
        """The weight [out, in] (or the ``outputs`` rows of it) in ``dtype``."""
        raise NotImplementedError

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = self.packed_matmul(rows)
        if out is None:  # many rows, or a dtype/device the packed ops do not take
            compute = torch.float32 if x.device.type == "cpu" else x.dtype
            rows = rows.to(compute)
            # int8: a few MB of widened weight at a time, not a float copy of the whole layer
            block = max(1, (1 << 21) // self.in_features) if self.bits == 8 else self.out_features
            out = torch.cat([F.linear(rows, self.dequantized_weight(compute, slice(start, start + block)))
                             for start in range(0, self.out_features, block)], dim=-1)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class Int8Linear(QuantizedLinear):
    """``y = x @ (weight * weight_scale[:, None]).T + bias`` with int8 ``weight`` [out, in]."""

    bits = 8

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.weight = nn.Parameter(weight.to(torch.int8).contiguous(), requires_grad=False)
        self.weight_scale = nn.Parameter(scale.to(dtype).contiguous(), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype=torch.bfloat16):
        return cls(*quantize_int8(weight), bias, dtype)

    def dequantized_weight(self, dtype=torch.float32, outputs: slice = slice(None)) -> torch.Tensor:
        return torch.mul(self.weight[outputs], self.weight_scale[outputs].to(dtype)[:, None])

    def packed_matmul(self, x):
        # CUDA: the widened weight through cuBLAS (half the bytes stay resident, no faster than bf16)
        if x.device.type != "cpu" or x.dtype != self.weight_scale.dtype or x.shape[0] > MAX_INT8_PACKED_ROWS:
            return None
        # decode steps on AVX2: vlmkit's kernel streams int8 about twice as fast as torch's packed op
        out = linear_int8(x, self.weight, self.weight_scale)
        return out if out is not None else torch._weight_int8pack_mm(x.contiguous(), self.weight, self.weight_scale)


class Int4Linear(QuantizedLinear):
    """4-bit weights in groups of ``group_size`` input channels, with a scale and a zero point each."""

    bits = 4

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__(q.shape[1], q.shape[0], bias)
        self.group_size = group_size
        # scales and zero points as both int4 kernels take them: [in / group, out, 2]
        scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        scale_zero = scale_zero.bfloat16() if q.device.type == "cuda" else scale_zero.to(dtype)
        self.weight = nn.Parameter(_pack_int4(q), requires_grad=False)
        self.weight_scale_zero = nn.Parameter(scale_zero, requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                   dtype=torch.bfloat16):
        return cls(*quantize_int4(weight, group_size), group_size, bias, dtype)

    @classmethod
    def from_portable(cls, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias=None,
                      dtype=torch.bfloat16):
        group_size = packed.shape[1] * 2 // scale.shape[1]
        return cls(unpack_nibbles(packed), scale.float(), zero.float(), group_size, bias, dtype)

    def values(self) -> torch.Tensor:
        """The 4-bit values 0..15 as uint8 [out, in], read back from the kernel's packing."""
        if self.weight.device.type == "cuda":
            raise NotImplementedError("reading int4 weights back from the CUDA packing; save from a CPU model")
        values = torch.empty(self.out_features, self.in_features, dtype=torch.uint8)
        rows = _block_rows(self.in_features)
        for start in range(0, self.out_features, rows):
            block = self.weight[start:start + rows]
            flat = torch.empty(block.shape[0] * self.in_features, dtype=torch.uint8)
            flat[_cpu_int4_positions(block.shape[0], self.in_features).to(torch.int64)] = \
                _nibbles(block).to(torch.uint8)
            values[start:start + block.shape[0]] = flat.view(block.shape[0], self.in_features)
        return values

    def dequantized_weight(self, dtype=torch.float32, outputs: slice = slice(None)) -> torch.Tensor:
        scale, zero = self.weight_scale_zero.transpose(0, 1).to(dtype)[outputs].unbind(-1)
        groups = self.values()[outputs].to(dtype).reshape(scale.shape[0], -1, self.group_size)
        return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(scale.shape[0], self.in_features)

    def packed_matmul(self, x):
        if x.device.type == "cuda" and x.dtype == torch.bfloat16:
            return torch._weight_int4pack_mm(x.contiguous(), self.weight, self.group_size, self.weight_scale_zero)
        if x.device.type == "cpu" and x.dtype == self.weight_scale_zero.dtype:
            return torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.weight, self.group_size,
                                                     self.weight_scale_zero)
        return None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the portable form (any device can repack it), not the kernel's packing
        scale, zero = self.weight_scale_zero.transpose(0, 1).unbind(-1)
        destination[prefix + "weight"] = pack_nibbles(self.values())
        destination[prefix + "weight_scale"] = scale.contiguous()
        destination[prefix + "weight_zero"] = zero.contiguous()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


def int4_group_size(out_features: int, in_features: int, group_size: int, device: torch.device) -> int | None:
    """The group size an int4 layer gets: ``group_size``, or for narrower layers the largest of 64 and 32
    that divides its inputs; None where the device's int4 kernel cannot take the layer's shape (CPU:
    outputs a multiple of 16; CUDA: of 8, inputs of 128), which is then quantized to int8."""
    if device.type == "cuda" and (out_features % 8 or in_features % 128):
        return None
    if device.type != "cuda" and out_features % 16:
        return None
    for size in (group_size, 64, 32):
        if size <= group_size and in_features % size == 0:
            return size
    return None


class WeightOnlyMethod:
    """``take``/``build`` for ``StreamingQuantizer``: quantize each chosen layer's weight as it streams
    in (or read the stored int8/int4 tensors of a vlmkit-quantized checkpoint)."""

    suffixes = frozenset({"weight", "weight_scale", "weight_zero"})

    def __init__(self, config: WeightOnlyConfig, device: torch.device, dtype: torch.dtype, pre_quantized: bool):
        self.config, self.device, self.dtype, self.pre_quantized = config, device, dtype, pre_quantized

    def bits_for(self, name: str) -> int:
        return 8 if self.config.bits == 8 or name.startswith(VISION_SIDE) else 4

    def take(self, module_name: str, suffix: str, tensor: torch.Tensor):
        if self.pre_quantized:
            return tensor.to(self.device)
        weight = tensor.to(self.device)
        group = self._int4_group(*weight.shape, self.config.group_size) if self.bits_for(module_name) == 4 else None
        if group is None:
            return Int8Linear.from_float(weight, dtype=self.dtype)
        return Int4Linear.from_float(weight, group, dtype=self.dtype)

    def _int4_group(self, out_features: int, in_features: int, group_size: int) -> int | None:
        if self.device.type == "cuda" and self.dtype != torch.bfloat16:
            return None  # torch's CUDA int4 kernel takes bfloat16 activations only
        return int4_group_size(out_features, in_features, group_size, self.device)

    def build(self, linear: nn.Linear, taken: dict) -> nn.Module:
        bias = None if linear.bias is None else linear.bias.detach()
        if not self.pre_quantized:
            module = taken["weight"]
            module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            return module
        if "weight_zero" not in taken:
            return Int8Linear(taken["weight"], taken["weight_scale"], bias, self.dtype)
        packed, scale, zero = taken["weight"], taken["weight_scale"], taken["weight_zero"]
        group = packed.shape[1] * 2 // scale.shape[1]
        if self._int4_group(packed.shape[0], packed.shape[1] * 2, group) == group:
            return Int4Linear.from_portable(packed, scale, zero, bias, self.dtype)
        # saved where the int4 kernel took this shape, loaded where it does not: int8 of the same values
        groups = unpack_nibbles(packed).float().reshape(packed.shape[0], -1, group)
        weight = (groups - 8) * scale.float()[..., None] + zero.float()[..., None]
        return Int8Linear.from_float(weight.reshape(packed.shape[0], -1), bias, self.dtype)


def weight_only_module_names(model: nn.Module) -> list[str]:
    """Every plain linear layer except a tied LM head (it is the token embedding): decoder layers, LM head,
    Janus's generation head and aligner, and the vision side (in int8)."""
    tied = getattr(model.config, "ties_word_embeddings", False)
    return [name for name in plain_linear_names(model) if not (tied and name == "lm_head")]


def stored_weight_only_module_names(tensor_names: list[str]) -> list[str]:
    """The layers a vlmkit-quantized checkpoint holds quantized (those with a ``weight_scale``)."""
    return sorted(n.removesuffix(".weight_scale") for n in tensor_names if n.endswith(".weight_scale"))
