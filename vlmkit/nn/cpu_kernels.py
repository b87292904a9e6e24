"""vlmkit's compiled CPU kernels and when they run instead of torch's ops. Weights stay in memory as
they are (bf16, or vlmkit's int8/int4) throughout.

* Decode steps (a few activation rows): every weight is read once per token, so speed is how fast
  weights stream from memory; torch's ``F.linear`` is compute-bound or overhead-bound there. ``csrc/``
  streams bf16, int8 and 4-bit weights at memory speed, attends one query over the KV cache, and runs
  a whole decoder layer's step in one call. It is built once (``kernel_build``: needs a C++ compiler;
  about a minute) on every x86 CPU with AVX2 and FMA; the products have an AVX-512 BF16/VNNI variant
  chosen at run time on CPUs that have it (``cpu_features.kernel_isa``). Where nothing can be built,
  torch's ops run.
* Prefill and vision towers (many rows) and every convolution: on CPUs without native bf16, torch's
  bf16 GEMM runs at a fifth of its fp32 speed and its bf16 convolution far slower, so these compute in
  fp32 (weights widened per call, fp32 accumulation) and round the result to bf16. On CPUs with native
  bf16 (AVX-512 BF16, AMX) torch's bf16 GEMM is 4-9x faster than that fp32 path and runs as it is.
* Quantized weights (``vlmkit.quant``): ``linear_int8`` and ``linear_int4`` multiply integers (16-bit
  activations rounded once per product: to int16 against int8 weights, to int8 per weight group
  against 4-bit ones), for any layer width and row count up to their limits; beyond them, and on CPUs
  without the kernels, the weight is widened a block at a time for the float GEMM. torch's own packed
  int8 CPU op is never called: it crashes on some CPUs for small or unaligned shapes.

Float32 and every other device or dtype take torch's ordinary path, unchanged. ``VLMKIT_CPU_KERNELS``
picks the kernels (``auto``, ``avx512``, ``avx2``, ``off``: see ``cpu_features``); with ``off`` int4
layers are int8. Each C++ kernel's Python twin, and the tests that keep them equal: the decode layer step
and ``nn.decoder.DecoderLayer`` (``tests/test_cpu_kernels.py``)."""

import contextlib
import math

import torch
from torch.nn import functional as F

from .cpu_features import kernel_isa, native_bf16
from .kernel_build import compiled_kernels

# Below this many weights the call overhead outweighs the gain (and tiny test models never build it).
MIN_KERNEL_WEIGHTS = 1 << 20
# Up to this many activation rows the kernels beat the float GEMM (bf16: torch's native one where the CPU
# has it, else the fp32 one); beyond, a product is compute-bound and the GEMM wins. Measured on 2 cores,
# 2048x5632 weights out of cache: AVX2 without native bf16 against the fp32 GEMM; AVX2 (forced) and
# AVX-512 on a Zen 4 against torch's bf16 GEMM (AVX-512: 3.1-4.5 ms up to 7 rows, torch 4.5-5.0 ms).
MAX_BF16_KERNEL_ROWS = {("avx2", False): 16, ("avx2", True): 3, ("avx512", True): 7}
MAX_INT8_KERNEL_ROWS = 128
# The int4 kernel unpacks each weight once per four activation rows; beyond this many rows widening the
# weight a block at a time and running the float GEMM wins (measured on 2 AVX2 cores, 2048x5632).
MAX_INT4_KERNEL_ROWS = 64

# The int8 kernel rounds activation rows to int16 (a scale per row), which loses nothing 16-bit activations
# carry; the 4-bit one to int8 per weight group, far below its weights' own rounding. float32 activations
# take the float path instead.
INT16_EXACT_ENOUGH = (torch.bfloat16, torch.float16)


def kernels_enabled() -> bool:
    """Whether vlmkit's compiled kernels may run on this CPU (x86 with AVX2 and FMA, not turned off)."""
    return kernel_isa() is not None


def widen_bf16_cpu() -> bool:
    """Whether bf16 GEMMs and convolutions with many rows compute in fp32 here (a CPU without native bf16
    arithmetic, where torch's bf16 ones are slow), kernels not turned off."""
    return kernels_enabled() and not native_bf16()


def max_bf16_kernel_rows() -> int:
    """How many activation rows the bf16 kernel takes on this CPU before the GEMM wins."""
    return MAX_BF16_KERNEL_ROWS[(kernel_isa() or "avx2", native_bf16())]


@contextlib.contextmanager
def torch_ops_on_one_thread(tensor: torch.Tensor):
    """Run the block's torch ops on one thread where ``tensor`` (a decode step's logits) is on a CPU whose
    decode steps run vlmkit's kernels. After an op on several threads torch's idle OpenMP threads spin for
    milliseconds (unless OMP_WAIT_POLICY=PASSIVE), on the cores the kernels' own threads need for the next
    step: choosing a token from a 152K vocabulary cost a LLaVA-OneVision-0.5B step 4-5 ms of its ~30 on 2
    cores (2026-12-06); on one thread the choice takes well under a millisecond."""
    threads = torch.get_num_threads()
    if threads == 1 or tensor.device.type != "cpu" or not kernels_enabled():
        yield
        return
    torch.set_num_threads(1)  # OpenMP keeps this per calling thread
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# A product of at most this many multiply-adds runs on one thread (well under a millisecond there).
FEW_PRODUCT_VALUES = 1 << 20


def on_one_thread_if_small(tensor: torch.Tensor, max_values: int):
    """``torch_ops_on_one_thread`` for work on at most ``max_values`` values, which more threads cannot
    speed up: some of torch's CPU ops (cos/sin through MKL, GELU through oneDNN) start their OpenMP team
    however few the values, and the team then spins on the cores the decode kernels need."""
    return torch_ops_on_one_thread(tensor) if tensor.numel() <= max_values else contextlib.nullcontext()



def _bf16_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and weight.device.type == "cpu")


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the bf16 decode kernel is the right tool for ``x @ weight.T`` (without building it)."""
    return (_bf16_on_cpu(x, weight) and kernels_enabled() and weight.numel() >= MIN_KERNEL_WEIGHTS
            and x.numel() <= max_bf16_kernel_rows() * weight.shape[1] and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def kernel_linears(x: torch.Tensor, weights: list[torch.Tensor],
                   biases: list[torch.Tensor | None]) -> list[torch.Tensor] | None:
    """``[F.linear(x, w, b) ...]`` for several weights in one kernel call (one parallel pass over all of
    them: q/k/v, gate/up), or None where the kernel does not apply or is unavailable."""
    if not all(kernel_applies(x, w) for w in weights):
        return None
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    ops = compiled_kernels()
    return None if ops is None else ops.linear_bf16(x, weights, [b for b in biases if b is not None])


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; for bf16 on a CPU the decode kernel (few rows), or fp32 compute (many rows, on a CPU
    without native bf16)."""
    out = kernel_linears(x, [weight], [bias])
    if out is not None:
        return out[0]
    if _bf16_on_cpu(x, weight) and widen_bf16_cpu() and x.numel() > max_bf16_kernel_rows() * weight.shape[-1]:
        return F.linear(x.float(), weight.float(), _float(bias)).to(x.dtype)
    # a small bf16 product (Janus' image aligner: 2 rows x 8 inputs) on one thread, as oneDNN starts its OpenMP
    # team for any size (float32 products stay exactly torch's, threads and all)
    if _bf16_on_cpu(x, weight):
        with on_one_thread_if_small(x, FEW_PRODUCT_VALUES // max(weight.shape[0], 1)):
            return F.linear(x, weight, bias)
    return F.linear(x, weight, bias)


# Below this many values torch's ops for a norm or a rotary cost less than the call to a prefill kernel (and tiny
# test models never build the kernels).
MIN_PREFILL_KERNEL_VALUES = 1 << 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``nn.norms.RMSNorm`` of many bf16 rows (a prefill) in one pass, ``csrc/rms_norm.cpp``; None where
    torch's ops run instead (few rows, other dtypes or devices, gradients wanted, no kernels)."""
    if not (_bf16_on_cpu(x, weight) and kernels_enabled() and x.numel() >= MIN_PREFILL_KERNEL_VALUES
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    ops = compiled_kernels()
    return None if ops is None else ops.rms_norm_bf16(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``nn.rotary.rotate`` of a prefill's many bf16 queries or keys x [B, H, L, D] by cos/sin [B, L, D] in
    one pass, ``csrc/rotary.cpp``; None where torch's ops run instead (few rows, other dtypes or devices,
    gradients wanted, no kernels)."""
    if not (x.dtype == cos.dtype == sin.dtype == torch.bfloat16 and x.device.type == "cpu" and kernels_enabled()
            and x.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape == (x.shape[0], *x.shape[2:])
            and x.shape[-1] % 2 == 0 and x.numel() >= MIN_PREFILL_KERNEL_VALUES
            and x.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return None
    ops = compiled_kernels()
    return None if ops is None else ops.rotary_bf16(x, cos, sin)


def conv_in_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a convolution of bf16 ``x`` with ``weight`` should compute in fp32 (CPU without native bf16)."""
    return _bf16_on_cpu(x, weight) and widen_bf16_cpu()


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor | None:
    """Attention of one query position [B, H, 1, D] over cached keys/values [B, Hkv, L, D] (``mask``: the
    boolean [B, 1, 1, L] from ``causal_mask``, or None), or None where the kernel does not apply."""
    if not (q.dtype == keys.dtype == values.dtype == torch.bfloat16 and q.device.type == "cpu"
            and q.shape[2] == 1 and q.shape[-1] % 8 == 0 and kernels_enabled()
            and keys.stride(-1) == 1 and keys.stride(-2) == keys.shape[-1] and keys.stride() == values.stride()
            and (mask is None or mask.dtype == torch.bool)
            and not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad))):
        return None
    ops = compiled_kernels()
    if ops is None:
        return None
    return ops.decode_attention_bf16(q, keys, values, mask, q.shape[-1] ** -0.5)


# Below this many query positions torch's SDPA is as quick (and a decode step has its own kernel).
MIN_PREFILL_ATTENTION_QUERIES = 16


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                      is_causal: bool) -> torch.Tensor | None:
    """SDPA of many query positions [B, H, Lq, D] over keys/values [B, Hkv, Lk, D] (``mask``: boolean,
    broadcastable to [B, 1, Lq, Lk]; ``is_causal``: query i sees keys up to i + Lk - Lq) by vlmkit's
    AVX-512 BF16 flash attention, 3.4-6x torch's CPU flash attention there; None where it does not
    apply (another CPU, dtype or head size; fp32 scores and sums as torch's flash attention keeps)."""
    if not (q.dtype == keys.dtype == values.dtype == torch.bfloat16 and q.device.type == "cpu"
            and q.dim() == 4 and q.shape[2] >= MIN_PREFILL_ATTENTION_QUERIES and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and q.shape[2] <= keys.shape[2] and kernels_enabled()
            and q.stride(-1) == keys.stride(-1) == values.stride(-1) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1))
            and not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad))):
        return None
    ops = compiled_kernels()
    if ops is None or ops.kernel_isa() != "avx512":
        return None
    return ops.prefill_attention_bf16(q, keys, values, mask, is_causal and mask is None, q.shape[-1] ** -0.5)


def _layer_step_parts(linear) -> list[torch.Tensor] | None:
    """``linear``'s weight as the one-call layer step reads it: [bf16 weight], or a quantized layer's
    ``layer_step_parts()`` ([int8, scale] or [nibbles, scale, zero]); None where it cannot."""
    if hasattr(linear, "layer_step_parts"):
        return linear.layer_step_parts()
    return [linear.weight] if linear.weight.dtype == torch.bfloat16 and linear.weight.is_contiguous() else None


def _layer_step_operands(layer) -> tuple | None:
    """(the most activation rows the step is worth running for, its weight operands) for ``layer``, or
    None where the step does not apply (a layer that is not exactly the LLaMA/Qwen2 block, or a weight
    the kernel cannot read)."""
    if not layer.is_plain():
        return None
    attention, mlp = layer.self_attn, layer.mlp
    linears = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj,
               mlp.down_proj)
    parts = [_layer_step_parts(linear) for linear in linears]
    if any(p is None for p in parts) or attention.head_dim % 8:
        return None
    q, o = attention.q_proj, attention.o_proj
    # biases in fp32 once here, not converted by every step (Qwen2: 72 small copies a step, ~1 ms)
    qkv_bias = [] if q.bias is None else [b.float() for b in (q.bias, attention.k_proj.bias, attention.v_proj.bias)]
    # the most rows the slowest of its products is worth the kernel for
    max_rows = min({1: max_bf16_kernel_rows(), 2: MAX_INT8_KERNEL_ROWS, 3: MAX_INT4_KERNEL_ROWS}[len(part)]
                   for part in parts)
    return max_rows, (layer.input_layernorm.weight, layer.post_attention_layernorm.weight, layer.input_layernorm.eps,
                      *parts[:3], qkv_bias, parts[3], [o.bias.float()] if o.bias is not None else [], *parts[4:])


def decoder_layer_step(layer, hidden: torch.Tensor, rotary: tuple, mask: torch.Tensor | None, cache,
                       layer_index: int) -> torch.Tensor | None:
    """One decode step (one new position) through a whole LLaMA/Qwen2 ``DecoderLayer`` in a single kernel
    call, writing its keys/values into ``cache``; None where that does not apply (the caller then runs
    the layer's modules). Linear layers may be bf16 or vlmkit's int8/int4. Which layers qualify, and their
    operands, are worked out once per cache (~30 us of module lookups per layer, 3% of an int4 step):
    a model's modules do not change while it generates."""
    if not (hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu" and hidden.shape[1] == 1
            and kernels_enabled() and cache.keys.dtype == torch.bfloat16 and not torch.is_grad_enabled()):
        return None
    if layer_index not in cache.layer_steps:
        cache.layer_steps[layer_index] = _layer_step_operands(layer)
    step = cache.layer_steps[layer_index]
    ops = compiled_kernels() if step is not None and hidden.shape[0] <= step[0] else None
    if ops is None:
        return None
    operands = step[1]
    cos, sin = rotary
    return ops.decoder_layer_step_bf16(hidden, *operands, cos, sin, cache.keys[layer_index],
                                       cache.values[layer_index], cache.length, mask, layer.self_attn.num_heads)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ (weight * scale[:, None]).T + bias`` for int8 ``weight`` [out, in] with one scale per output,
    by the kernel (up to ``MAX_INT8_KERNEL_ROWS`` activation rows, any width, on a CPU where it is built),
    or None where it does not apply."""
    if not (x.device.type == "cpu" and x.dtype in INT16_EXACT_ENOUGH and weight.dtype == torch.int8
            and weight.is_contiguous() and weight.device.type == "cpu" and kernels_enabled()
            and x.numel() <= MAX_INT8_KERNEL_ROWS * weight.shape[1]
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return None
    ops = compiled_kernels()
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
            and packed.device.type == "cpu" and packed.is_contiguous() and kernels_enabled()
            and x.numel() <= MAX_INT4_KERNEL_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return None
    ops = compiled_kernels()
    return None if ops is None else ops.linear_int4(x, packed, scale, zero, bias)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor | None:
    """The float32 weight [out, in] of ``linear_int4``'s operands (many-row products widen a block of rows
    at a time and run the float GEMM), or None where the kernels are unavailable."""
    if packed.device.type != "cpu" or not kernels_enabled():
        return None
    ops = compiled_kernels()
    return None if ops is None else ops.dequantize_int4(packed, scale, zero)


# Below this size glibc's own heap keeps freed memory for reuse; above it (and past 32 MiB always) each
# allocation is mapped anew and faulted in page by page as it is first written.
MIN_REUSABLE_BYTES = 16 << 20


def reusable_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape)``, except that a large CPU buffer (a request's KV cache) takes memory kept from
    an earlier one that is gone, already faulted in (``csrc/reusable_memory.cpp``): ~30 ms of page faults
    less per Janus-Pro-1B first token."""
    nbytes = math.prod(shape) * dtype.itemsize
    ops = compiled_kernels() if torch.device(device).type == "cpu" and nbytes >= MIN_REUSABLE_BYTES else None
    if ops is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ops.reusable_empty(nbytes).view(dtype).view(shape)
