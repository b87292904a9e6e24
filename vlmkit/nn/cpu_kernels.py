"""bf16 on CPUs without native bf16 arithmetic (x86 with AVX2, no AVX-512 BF16 or AMX): where torch's
own bf16 kernels are slow, and what vlmkit runs instead. Weights stay bf16 in memory throughout.

* Decode steps (a few activation rows): every weight is read once per token, so speed is how fast
  weights stream from memory; torch's bf16 ``F.linear`` is compute-bound at about half that.
  ``csrc/`` widens bf16 to fp32 in registers and keeps up with memory; it also attends one query over
  the KV cache (torch's SDPA has more setup than work there) and runs a whole decoder layer's step in
  one call (bf16, int8 or 4-bit weights). It is compiled
  once with torch's extension builder (needs a C++ compiler; about a minute) into
  ``~/.cache/vlmkit/kernels``; where it cannot be built, torch's ops run.
* Prefill and vision towers (many rows) and every convolution: torch's bf16 GEMM runs at a fifth of
  its fp32 speed here and its bf16 convolution hundreds of times slower, so these compute in fp32
  (weights widened per call, fp32 accumulation as before) and round the result to bf16.
* Quantized weights (``vlmkit.quant``): ``linear_int8`` and ``linear_int4`` stream int8 and 4-bit weights
  for decode steps, multiplying integers (16-bit activations rounded once per product: to int16 for
  int8 weights, to int8 per weight group for 4-bit ones), and the one-call layer step takes them too; the int4 kernel (vlmkit's only int4 path on a CPU) is built
  on any CPU with AVX2 and FMA.

Float32 and every other device or dtype take torch's ordinary path, unchanged. ``VLMKIT_CPU_KERNELS``:
``0`` turns all of this off (int4 layers are then int8), ``1`` forces it on any x86 CPU with AVX2 and FMA."""

import hashlib
import os
import sys
import threading
import time
import warnings
from functools import cache
from pathlib import Path

import torch
from torch.nn import functional as F

_SOURCES = Path(__file__).with_name("csrc")
# Up to this many activation rows the kernel wins; beyond, a step is compute-bound and fp32 GEMM wins.
MAX_KERNEL_ROWS = 16
# The int4 kernel unpacks each weight once per four activation rows; beyond this many rows widening the
# weight a block at a time and running the fp32 GEMM wins (measured on 2 AVX2 cores, 2048x5632).
MAX_INT4_KERNEL_ROWS = 64
# Below this many weights the call overhead outweighs the gain (and tiny test models never build it).
MIN_KERNEL_WEIGHTS = 1 << 20

# The int8 kernel rounds activation rows to int16 (a scale per row), which loses nothing 16-bit activations
# carry; the 4-bit one to int8 per weight group, far below its weights' own rounding. float32 activations
# take torch's float path instead.
INT16_EXACT_ENOUGH = (torch.bfloat16, torch.float16)

_state = {"op": None, "tried": False}
_lock = threading.Lock()


@cache
def _cpu_flags() -> frozenset:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _setting() -> str:
    return os.environ.get("VLMKIT_CPU_KERNELS", "auto").strip().lower()


@cache
def avx2_cpu() -> bool:
    """Whether vlmkit's compiled kernels can run on this CPU (x86 with AVX2 and FMA, not turned off)."""
    return _setting() not in ("0", "off", "false", "no") and {"avx2", "fma"} <= _cpu_flags()


@cache
def slow_bf16_cpu() -> bool:
    """Whether this CPU lacks native bf16 arithmetic but has AVX2/FMA (where vlmkit's bf16 paths help)."""
    return avx2_cpu() and (_setting() in ("1", "on", "true", "yes")
                           or not _cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _build_directory() -> Path:
    root = Path(os.environ.get("VLMKIT_KERNEL_CACHE") or Path.home() / ".cache" / "vlmkit" / "kernels")
    digest = hashlib.sha256()
    for path in sorted(_SOURCES.glob("*.[ch]*")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(torch.__version__.encode())
    folder = root / f"decode_kernels-{digest.hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    # torch's builder waits forever on a lock left by a build that was killed: clear stale ones
    if lock.exists() and time.time() - lock.stat().st_mtime > 600:
        lock.unlink(missing_ok=True)
    return folder


def compiled_kernels():
    """``torch.ops.vlmkit`` with the compiled kernels, built on first use on any CPU with AVX2/FMA (the int4
    kernel is vlmkit's only int4 path on a CPU, native bf16 or not); None where unavailable."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["op"] = _load() if avx2_cpu() else None
                _state["tried"] = True
    return _state["op"]


def decode_kernels():
    """The compiled kernels where vlmkit's bf16 paths help (``slow_bf16_cpu``); None elsewhere."""
    return compiled_kernels() if slow_bf16_cpu() else None


def _load():
    if hasattr(torch.ops, "vlmkit") and hasattr(torch.ops.vlmkit, "decode_attention_bf16"):
        return torch.ops.vlmkit
    try:
        from torch.utils.cpp_extension import load
        folder = _build_directory()
        if not any(folder.glob("*.so")):
            print("vlmkit: compiling the CPU decode kernels once (about a minute)...", file=sys.stderr)
        sources = [str(path) for path in sorted(_SOURCES.glob("*.cpp"))]
        load("vlmkit_decode_kernels", sources, build_directory=str(folder), is_python_module=False,
             extra_cflags=["-O3", "-mavx2", "-mfma"], verbose=False)
        return torch.ops.vlmkit
    except Exception as err:  # no compiler, no headers...: decoding still works, at torch's speed
        warnings.warn(f"vlmkit: the CPU decode kernels could not be built ({type(err).__name__}: "
                      f"{str(err).strip()[:300]}); using torch's ops", stacklevel=3)
        return None


def _bf16_on_slow_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and weight.device.type == "cpu" and slow_bf16_cpu())


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the bf16 decode kernel is the right tool for ``x @ weight.T`` (without building it)."""
    return (_bf16_on_slow_cpu(x, weight) and weight.numel() >= MIN_KERNEL_WEIGHTS
            and x.numel() <= MAX_KERNEL_ROWS * weight.shape[1] and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def kernel_linears(x: torch.Tensor, weights: list[torch.Tensor],
                   biases: list[torch.Tensor | None]) -> list[torch.Tensor] | None:
    """``[F.linear(x, w, b) ...]`` for several weights in one kernel call (one parallel pass over all of
    them: q/k/v, gate/up), or None where the kernel does not apply or is unavailable."""
    if not all(kernel_applies(x, w) for w in weights):
        return None
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    ops = decode_kernels()
    return None if ops is None else ops.linear_bf16(x, weights, [b for b in biases if b is not None])


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; for bf16 on a slow-bf16 CPU, the decode kernel (few rows) or fp32 compute (many)."""
    out = kernel_linears(x, [weight], [bias])
    if out is not None:
        return out[0]
    if _bf16_on_slow_cpu(x, weight) and x.numel() > MAX_KERNEL_ROWS * weight.shape[-1]:
        return F.linear(x.float(), weight.float(), _float(bias)).to(x.dtype)
    return F.linear(x, weight, bias)


def conv_in_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a convolution of bf16 ``x`` with ``weight`` should compute in fp32 (slow-bf16 CPU)."""
    return _bf16_on_slow_cpu(x, weight)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor | None:
    """Attention of one query position [B, H, 1, D] over cached keys/values [B, Hkv, L, D] (``mask``: the
    boolean [B, 1, 1, L] from ``causal_mask``, or None), or None where the kernel does not apply."""
    if not (q.dtype == keys.dtype == values.dtype == torch.bfloat16 and q.device.type == "cpu"
            and q.shape[2] == 1 and q.shape[-1] % 8 == 0 and slow_bf16_cpu()
            and keys.stride(-1) == 1 and keys.stride(-2) == keys.shape[-1] and keys.stride() == values.stride()
            and (mask is None or mask.dtype == torch.bool)
            and not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad))):
        return None
    ops = decode_kernels()
    if ops is None:
        return None
    return ops.decode_attention_bf16(q, keys, values, mask, q.shape[-1] ** -0.5)


def _layer_step_parts(linear) -> list[torch.Tensor] | None:
    """``linear``'s weight as the one-call layer step reads it: [bf16 weight], or a quantized layer's
    ``layer_step_parts()`` ([int8, scale] or [nibbles, scale, zero]); None where it cannot."""
    if hasattr(linear, "layer_step_parts"):
        return linear.layer_step_parts()
    return [linear.weight] if linear.weight.dtype == torch.bfloat16 and linear.weight.is_contiguous() else None


def _layer_step_operands(layer) -> tuple | None:
    """The one-call layer step's weight operands for ``layer``, or None where the step does not apply
    (a layer that is not exactly the LLaMA/Qwen2 block, or a weight the kernel cannot read)."""
    if not layer.is_plain():
        return None
    attention, mlp = layer.self_attn, layer.mlp
    linears = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj,
               mlp.down_proj)
    parts = [_layer_step_parts(linear) for linear in linears]
    if any(p is None for p in parts) or attention.head_dim % 8:
        return None
    q, o = attention.q_proj, attention.o_proj
    qkv_bias = [q.bias, attention.k_proj.bias, attention.v_proj.bias] if q.bias is not None else []
    return (layer.input_layernorm.weight, layer.post_attention_layernorm.weight, layer.input_layernorm.eps,
            *parts[:3], qkv_bias, parts[3], [o.bias] if o.bias is not None else [], *parts[4:])


def decoder_layer_step(layer, hidden: torch.Tensor, rotary: tuple, mask: torch.Tensor | None, cache,
                       layer_index: int) -> torch.Tensor | None:
    """One decode step (one new position) through a whole LLaMA/Qwen2 ``DecoderLayer`` in a single kernel
    call, writing its keys/values into ``cache``; None where that does not apply (the caller then runs
    the layer's modules). Linear layers may be bf16 or vlmkit's int8/int4. Which layers qualify, and their
    operands, are worked out once per cache (~30 us of module lookups per layer, 3% of an int4 step):
    a model's modules do not change while it generates."""
    if not (hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu" and hidden.shape[1] == 1
            and slow_bf16_cpu() and cache.keys.dtype == torch.bfloat16 and not torch.is_grad_enabled()):
        return None
    if layer_index not in cache.layer_steps:
        cache.layer_steps[layer_index] = _layer_step_operands(layer)
    operands = cache.layer_steps[layer_index]
    ops = decode_kernels() if operands is not None else None
    if ops is None:
        return None
    cos, sin = rotary
    return ops.decoder_layer_step_bf16(hidden, *operands, cos, sin, cache.keys[layer_index],
                                       cache.values[layer_index], cache.length, mask, layer.self_attn.num_heads)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ (weight * scale[:, None]).T + bias`` for int8 ``weight`` [out, in] with one scale per output,
    by the decode kernel (a few activation rows on a CPU where it is built), or None where it does not
    apply. torch's own packed int8 kernel is compute-bound on AVX2 and streams a fraction of this."""
    if not (x.device.type == "cpu" and x.dtype in INT16_EXACT_ENOUGH and weight.dtype == torch.int8
            and weight.is_contiguous()
            and x.numel() <= MAX_KERNEL_ROWS * weight.shape[1] and slow_bf16_cpu()
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return None
    ops = decode_kernels()
    return None if ops is None else ops.linear_int8(x, weight, scale, bias)


def int4_kernel_available() -> bool:
    """Whether ``linear_int4`` runs here (building the kernels if need be): where it does not, vlmkit's int4
    layers on a CPU are int8."""
    return compiled_kernels() is not None


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ w.T + bias`` for 4-bit ``w`` as vlmkit stores it: ``packed`` uint8 [out, in / 2] (two values
    0..15 per byte, high nibble first), ``scale`` and ``zero`` [out, in / group] (groups of a multiple of
    32 inputs), w = (q - 8) * scale + zero; by the decode kernel for up to ``MAX_INT4_KERNEL_ROWS``
    activation rows, or None where it does not apply. The output has ``x``'s dtype."""
    if not (x.device.type == "cpu" and packed.dtype == torch.uint8 and x.dtype in INT16_EXACT_ENOUGH
            and x.numel() <= MAX_INT4_KERNEL_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return None
    ops = compiled_kernels()
    return None if ops is None else ops.linear_int4(x, packed, scale, zero, bias)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor | None:
    """The float32 weight [out, in] of ``linear_int4``'s operands (many-row products widen a block of rows
    at a time and run the float GEMM), or None where the kernels are unavailable."""
    if packed.device.type != "cpu":
        return None
    ops = compiled_kernels()
    return None if ops is None else ops.dequantize_int4(packed, scale, zero)
