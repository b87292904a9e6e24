// vlmkit's CPU kernels for x86 with AVX2 and FMA; the products run AVX-512 BF16/VNNI variants
// (products_avx512.cpp) where set_kernel_isa chose them. The Python side: vlmkit/nn/cpu_kernels.py.
//
// linear_bf16, linear_int8, linear_int4: y = x @ W^T (+ b) for a few activation rows, streaming bf16,
// int8 or 4-bit weights from memory (products.h); linear_bf16 takes several weights reading the same x
// (q/k/v, gate/up) in one pass. dequantize_int4 widens 4-bit weights for many-row products.
//
// decode_attention_bf16: one query position against the KV cache, fp32 inside, where torch's SDPA has
// more setup than work. prefill_attention_bf16 (AVX-512 BF16 only): many query positions, a flash
// attention whose products run at the CPU's bf16 speed.
//
// decoder_layer_step_bf16: a whole LLaMA/Qwen2 decoder layer for one new position (norms, q/k/v,
// rotary, KV cache write, attention, output projection, gated MLP, residuals) in one call, with bf16,
// int8 or 4-bit weights, which spares a decode step the ~40 small torch ops and Python calls per layer
// around the products.
//
// rms_norm_bf16: RMSNorm of many bf16 rows (prefills) in one pass, where torch's ops make seven;
// rotary_bf16: a prefill's rotary position embedding of queries or keys in one pass, where they make five.
//
// reusable_empty: uninitialised bytes for a large buffer (a KV cache) whose memory is kept, already
// faulted in, for the next one of its size once the last tensor viewing it is gone.
#include <torch/library.h>

#include <string>

#include "ops.h"
#include "products.h"

TORCH_LIBRARY(vlmkit, m) {
  m.def("linear_bf16(Tensor input, Tensor[] weights, Tensor[] biases) -> Tensor[]");
  m.def("linear_int8(Tensor input, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor input, Tensor weight, Tensor scale, Tensor zero, Tensor? bias) -> Tensor");
  m.def("dequantize_int4(Tensor weight, Tensor scale, Tensor zero) -> Tensor");
  // the instruction set of the product kernels: "avx2" or "avx512"; False where this build or this CPU lacks it
  m.def("set_kernel_isa(str isa) -> bool", [](c10::string_view isa) { return vlmkit::set_kernel_isa(std::string(isa)); });
  m.def("kernel_isa() -> str", [] { return vlmkit::kernel_isa(); });
  m.def("decode_attention_bf16(Tensor q, Tensor keys, Tensor values, Tensor? valid, float scale) -> Tensor");
  m.def("prefill_attention_bf16(Tensor q, Tensor keys, Tensor values, Tensor? mask, bool causal, float scale) -> Tensor");
  // each weight is a list of its parts: [bf16 weight], [int8 weight, scale] or [nibbles, scale, zero]
  m.def("decoder_layer_step_bf16(Tensor hidden, Tensor input_norm, Tensor post_attention_norm, float eps, "
        "Tensor[] q, Tensor[] k, Tensor[] v, Tensor[] qkv_bias, Tensor[] o, Tensor[] o_bias, Tensor[] gate, "
        "Tensor[] up, Tensor[] down, Tensor cos, Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "int position, Tensor? valid, int num_heads) -> Tensor");
  m.def("rms_norm_bf16(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_bf16(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("reusable_empty(int bytes) -> Tensor", &vlmkit::reusable_empty);
}

TORCH_LIBRARY_IMPL(vlmkit, CPU, m) {
  m.impl("linear_bf16", &vlmkit::linear_bf16);
  m.impl("linear_int8", &vlmkit::linear_int8);
  m.impl("linear_int4", &vlmkit::linear_int4);
  m.impl("dequantize_int4", &vlmkit::dequantize_int4);
  m.impl("decode_attention_bf16", &vlmkit::decode_attention_bf16);
  m.impl("prefill_attention_bf16", &vlmkit::prefill_attention_bf16);
  m.impl("decoder_layer_step_bf16", &vlmkit::decoder_layer_step_bf16);
  m.impl("rms_norm_bf16", &vlmkit::rms_norm_bf16);
  m.impl("rotary_bf16", &vlmkit::rotary_bf16);
}
