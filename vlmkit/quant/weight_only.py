"""vlmkit's own weight-only quantization: ``Int8Linear`` (symmetric, one scale per output channel) and
``Int4Linear`` (asymmetric, a scale and a zero point per group of input channels), and
``WeightOnlyMethod``, which decides the layers and builds them at load.

Decoding one token reads every weight once, so at batch 1 its speed is how fast the weights stream
from memory: one byte per weight (int8) or half a byte (int4) instead of two (bf16). On x86 CPUs with
AVX2 vlmkit's own kernels (``nn/csrc/``, with AVX-512 variants where the CPU has them) take the decode
steps, a whole decoder layer per call: they round the 16-bit activation rows once (to int16 against int8
weights, to int8 per group against int4 ones as they are saved, two values per byte) and multiply
integers. Many-row products (prefill, vision towers) widen a few MB of weight at a time and run the
float GEMM. On CPUs without the kernels (ARM, x86 without AVX2, ``VLMKIT_CPU_KERNELS=off``), and for
float32 activations, both widen blocks of their weight; int4 on a CPU needs vlmkit's kernels, and where
they cannot run layers asked for int4 are int8. CUDA runs torch's ``_weight_int4pack_mm`` on its own
packing (bfloat16 only), and int8 widened through cuBLAS.

``state_dict`` holds the portable form, which is also the CPU layout: int8 ``weight`` + ``weight_scale``
[out]; int4 ``weight`` uint8 [out, in / 2] (two values per byte, high nibble first), ``weight_scale``
and ``weight_zero`` [out, in / group], w = (q - 8) * scale + zero (torch's int4 rule). Scales and zero
points are kept in the model's dtype; quantized models should run in bfloat16 (the checkpoints' own)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..io.memory import empty_weight
from ..nn.cpu_kernels import dequantize_int4, int4_kernel_available, linear_int4, linear_int8
from .config import WeightOnlyConfig
from .loading import plain_linear_names

# Layers that only ever see image features (computed once per image, from hundreds of patches at once)
# are quantized to int8 in int4 models too: 4 bits would buy them no speed and cost accuracy.
VISION_SIDE = ("model.vision_model.", "model.vision_tower.", "model.aligner.", "model.multi_modal_projector.",
               "model.perceiver_resampler.")


def block_rows(in_features: int) -> int:
    """Rows of a weight that make a few MB (2M values) once widened to float32."""
    return max(1, (1 << 21) // in_features)


def _row_blocks(weight: torch.Tensor):
    """(rows, float32 block) a few MB at a time. The callers write each block's result into tensors of
    the final size: quantizing a 100k-row LM head holds neither several float copies of it nor a list of
    quantized blocks beside their concatenation (whose freed memory the allocator keeps)."""
    rows = block_rows(weight.shape[1])
    return ((slice(start, start + rows), weight[start:start + rows].float())
            for start in range(0, weight.shape[0], rows))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest per output channel: (int8 [out, in], fp32 scale [out])."""
    values = empty_weight(weight.shape, torch.int8, weight.device)
    scales = torch.empty(weight.shape[0], device=weight.device)
    for rows, block in _row_blocks(weight):
        scale = (block.abs().amax(dim=1) / 127).clamp(min=1e-12)
        values[rows] = torch.round(block / scale[:, None]).clamp(-127, 127)
        scales[rows] = scale
    return values, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest in groups of ``group_size`` inputs: (values 0..15 two per byte as
    ``pack_nibbles`` packs them, uint8 [out, in / 2]; fp32 scale and zero [out, in / group]) with
    w ~ (q - 8) * scale + zero."""
    out_features, in_features = weight.shape
    packed = empty_weight((out_features, in_features // 2), torch.uint8, weight.device)
    scales, zeros = (torch.empty(out_features, in_features // group_size, device=weight.device) for _ in range(2))
    for rows, block in _row_blocks(weight):
        groups = block.reshape(block.shape[0], -1, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        packed[rows] = pack_nibbles(q.reshape(block.shape).to(torch.uint8))
        scales[rows], zeros[rows] = scale, low + 8 * scale
    return packed, scales, zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] of 0..15 -> [out, in / 2], high nibble first (what the CUDA packer takes)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


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
            # a few MB of widened weight at a time, not a float copy of the whole layer
            block = block_rows(self.in_features)
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

    def layer_step_parts(self) -> list[torch.Tensor] | None:
        """The weight as ``cpu_kernels.decoder_layer_step`` reads it (CPU only)."""
        return [self.weight, self.weight_scale] if self.weight.device.type == "cpu" else None

    def packed_matmul(self, x):
        # vlmkit's kernel for up to MAX_INT8_KERNEL_ROWS rows on an x86 CPU with AVX2; elsewhere (CUDA through
        # cuBLAS, CPUs without the kernel, float32 activations, many rows) the widened weight. torch's own
        # packed int8 CPU op is not used: it crashes on some CPUs (AVX-512) for small or unaligned shapes.
        return linear_int8(x, self.weight, self.weight_scale)


class Int4Linear(QuantizedLinear):
    """4-bit weights in groups of ``group_size`` input channels, with a scale and a zero point each:
    w = (q - 8) * scale + zero. On a CPU the layer holds the portable form itself (``weight`` uint8
    [out, in / 2], two values per byte, high nibble first; ``weight_scale`` and ``weight_zero``
    [out, in / group] in the model's dtype), which vlmkit's int4 kernel reads as it is; on CUDA, torch's
    int4 packing and its [in / group, out, 2] bfloat16 ``weight_scale_zero``."""

    bits = 4

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__(packed.shape[1] * 2, packed.shape[0], bias)
        self.group_size = self.in_features // scale.shape[1]
        self.cuda_packing = packed.device.type == "cuda"
        if self.cuda_packing:
            scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()
            self.weight = nn.Parameter(torch._convert_weight_to_int4pack(packed.contiguous(), 8), requires_grad=False)
            self.weight_scale_zero = nn.Parameter(scale_zero, requires_grad=False)
        else:
            self.weight = nn.Parameter(packed.to(torch.uint8).contiguous(), requires_grad=False)
            self.weight_scale = nn.Parameter(scale.to(dtype).contiguous(), requires_grad=False)
            self.weight_zero = nn.Parameter(zero.to(dtype).contiguous(), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                   dtype=torch.bfloat16):
        return cls(*quantize_int4(weight, group_size), bias, dtype)

    @classmethod
    def from_portable(cls, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias=None,
                      dtype=torch.bfloat16):
        """The layer from its saved form (``state_dict``'s ``weight``, ``weight_scale``, ``weight_zero``)."""
        return cls(packed, scale, zero, bias, dtype)

    def values(self) -> torch.Tensor:
        """The 4-bit values 0..15 as uint8 [out, in]."""
        if self.cuda_packing:
            raise NotImplementedError("reading int4 weights back from the CUDA packing; save from a CPU model")
        return unpack_nibbles(self.weight)

    def dequantized_weight(self, dtype=torch.float32, outputs: slice = slice(None)) -> torch.Tensor:
        if self.cuda_packing:
            raise NotImplementedError("widening int4 weights from the CUDA packing")
        widened = dequantize_int4(self.weight[outputs], self.weight_scale[outputs], self.weight_zero[outputs])
        if widened is not None:
            return widened.to(dtype)
        scale, zero = self.weight_scale[outputs].to(dtype), self.weight_zero[outputs].to(dtype)
        groups = unpack_nibbles(self.weight[outputs]).to(dtype).reshape(scale.shape[0], -1, self.group_size)
        return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(scale.shape[0], self.in_features)

    def layer_step_parts(self) -> list[torch.Tensor] | None:
        """The weight as ``cpu_kernels.decoder_layer_step`` reads it (the CPU layout only)."""
        return None if self.cuda_packing else [self.weight, self.weight_scale, self.weight_zero]

    def packed_matmul(self, x):
        if self.cuda_packing:
            if x.device.type == "cuda" and x.dtype == torch.bfloat16:
                return torch._weight_int4pack_mm(x.contiguous(), self.weight, self.group_size, self.weight_scale_zero)
            return None
        return linear_int4(x, self.weight, self.weight_scale, self.weight_zero)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the CPU layout is the portable form every device loads; torch's CUDA packing is not
        if self.cuda_packing:
            raise NotImplementedError("saving int4 weights from the CUDA packing; save from a CPU model")
        super()._save_to_state_dict(destination, prefix, keep_vars)


def int4_group_size(out_features: int, in_features: int, group_size: int, device: torch.device) -> int | None:
    """The group size an int4 layer gets: ``group_size``, or for narrower layers the largest of 64 and 32
    that divides its inputs; None where the device's int4 kernel cannot take the layer (CPU: vlmkit's
    kernel is not available here; CUDA: outputs a multiple of 8, inputs of 128), which is then quantized
    to int8."""
    if device.type == "cuda" and (out_features % 8 or in_features % 128):
        return None
    if device.type != "cuda" and not int4_kernel_available():
        return None  # without the kernel every int4 product would widen the whole weight
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

    def stored_problem(self, name: str, linear: nn.Linear, taken: dict) -> str | None:
        """What is wrong with a stored layer's tensors for ``linear`` (naming the tensor, what it is and what
        it should be), or None. A damaged tensor would otherwise load and only fail, or silently compute
        garbage, at the first forward."""
        weight, out_features, in_features = taken["weight"], linear.out_features, linear.in_features
        if weight.dtype == torch.int8:
            expected = {"weight": ((out_features, in_features), "int8"),
                        "weight_scale": ((out_features,), FLOAT_KIND)}
            if "weight_zero" in taken:
                return f"{name}.weight_zero belongs to an int4 layer, but {name}.weight is int8"
        elif weight.dtype == torch.uint8 and self.config.bits == 4:
            groups = _stored_groups(taken)
            if groups is None or in_features % 2 or in_features % groups:
                groups = "groups"  # a shape no stored group count fits; the message gives the rule
            expected = {"weight": ((out_features, in_features // 2), "uint8"),
                        "weight_scale": ((out_features, groups), FLOAT_KIND),
                        "weight_zero": ((out_features, groups), FLOAT_KIND)}
        else:
            kinds = "int8" if self.config.bits == 8 else "int8 or uint8 (int4, two values a byte)"
            return f"{name}.weight is stored as {_dtype_name(weight.dtype)}; a vlmkit int{self.config.bits} layer's is {kinds}"
        for suffix, (shape, kind) in expected.items():
            problem = _tensor_problem(f"{name}.{suffix}", taken.get(suffix), shape, kind)
            if problem:
                return problem + (f" (groups: a number of input-channel groups dividing {in_features})"
                                  if "groups" in shape else "")
        return None

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


FLOAT_KIND = "float32/bfloat16/float16"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stored_groups(taken: dict) -> int | None:
    scale = taken.get("weight_scale")
    return scale.shape[1] if scale is not None and scale.dim() == 2 and scale.shape[1] > 0 else None


def _tensor_problem(name: str, tensor: torch.Tensor | None, shape: tuple, kind: str) -> str | None:
    """Why ``tensor`` cannot be the layer's ``name`` of ``shape`` and dtype ``kind``, or None."""
    if tensor is None:
        return f"{name} is missing"
    dtype_ok = tensor.is_floating_point() if kind == FLOAT_KIND else _dtype_name(tensor.dtype) == kind
    if tuple(tensor.shape) != shape or not dtype_ok:
        return (f"{name} is {_dtype_name(tensor.dtype)} {tuple(tensor.shape)}, the layer needs {kind} "
                f"{shape}".replace("'groups'", "groups"))
    return None


def weight_only_module_names(model: nn.Module) -> list[str]:
    """Every plain linear layer except a tied LM head (it is the token embedding): decoder layers, LM head,
    Janus's generation head and aligner, and the vision side (in int8)."""
    tied = getattr(model.config, "ties_word_embeddings", False)
    return [name for name in plain_linear_names(model) if not (tied and name == "lm_head")]


def stored_weight_only_module_names(tensor_names: list[str]) -> list[str]:
    """The layers a vlmkit-quantized checkpoint holds quantized (those with a ``weight_scale``)."""
    return sorted(n.removesuffix(".weight_scale") for n in tensor_names if n.endswith(".weight_scale"))
