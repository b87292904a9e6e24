// The operators in torch.ops.vlmkit (registered in register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace vlmkit {

// linear_ops.cpp
std::vector<at::Tensor> linear_bf16(const at::Tensor& input, at::TensorList weights, at::TensorList biases);
at::Tensor linear_int8(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias);
at::Tensor linear_int4(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& zero, const std::optional<at::Tensor>& bias);
at::Tensor dequantize_int4(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero);

// decode_step.cpp
at::Tensor decode_attention_bf16(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                 const std::optional<at::Tensor>& valid, double scale);
at::Tensor decoder_layer_step_bf16(const at::Tensor& hidden, const at::Tensor& input_norm,
                                   const at::Tensor& post_attention_norm, double eps, at::TensorList q,
                                   at::TensorList k, at::TensorList v, at::TensorList qkv_bias, at::TensorList o,
                                   at::TensorList o_bias, at::TensorList gate, at::TensorList up,
                                   at::TensorList down, const at::Tensor& cos, const at::Tensor& sin,
                                   const at::Tensor& key_cache, const at::Tensor& value_cache, int64_t position,
                                   const std::optional<at::Tensor>& valid, int64_t num_heads);

// attention_avx512.cpp
at::Tensor prefill_attention_bf16(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                  const std::optional<at::Tensor>& mask, bool causal, double scale);

// rotary.cpp
at::Tensor rotary_bf16(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// reusable_memory.cpp
at::Tensor reusable_empty(int64_t bytes);

// rms_norm.cpp
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace vlmkit
