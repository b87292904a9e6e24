// linear_bf16, linear_int8, linear_int4 (weights_product for a few rows) and dequantize_int4.
#include <ATen/ops/empty.h>

#include <algorithm>

#include "ops.h"
#include "products.h"
#include "work_pool.h"

namespace vlmkit {
namespace {

// input [..., K] times each weight (its parts), biases added in fp32: the sums [B, sum N_i] in fp32.
at::Tensor products(const at::Tensor& input, const std::vector<at::TensorList>& weights, at::TensorList biases,
                    const char* op) {
  TORCH_CHECK(input.device().is_cpu(), op, " runs on the CPU");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), op, ": one bias per weight, or none");
  const int64_t K = input.size(-1);
  const PackedWeights packed(weights, K, op);
  at::Tensor x = input.reshape({-1, K}).to(at::kFloat).contiguous();
  at::Tensor sums = at::empty({x.size(0), packed.N}, x.options());
  weights_product(x.const_data_ptr<float>(), x.size(0), K, packed.list, sums.data_ptr<float>());
  int64_t column = 0;
  for (size_t i = 0; i < biases.size(); ++i) {
    sums.narrow(1, column, packed.list[i].N).add_(biases[i].to(at::kFloat));
    column += packed.list[i].N;
  }
  return sums;
}

// The fp32 sums in ``dtype`` (bf16 rounded on vlmkit's threads, not by a torch op on torch's).
at::Tensor rounded(const at::Tensor& sums, at::ScalarType dtype) {
  if (dtype != at::kBFloat16) return sums.to(dtype);
  at::Tensor out = at::empty(sums.sizes(), sums.options().dtype(at::kBFloat16));
  round_to_bf16(sums.const_data_ptr<float>(), sums.numel(), out.data_ptr<BFloat16>());
  return out;
}

// The sums rounded to the input's dtype, shaped [..., N].
at::Tensor shaped_like(const at::Tensor& sums, const at::Tensor& input) {
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = sums.size(1);
  return rounded(sums, input.scalar_type()).reshape(shape);
}

std::vector<at::Tensor> optional_bias(const std::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) return {*bias};
  return {};
}

}  // namespace

std::vector<at::Tensor> linear_bf16(const at::Tensor& input, at::TensorList weights, at::TensorList biases) {
  TORCH_CHECK(!weights.empty(), "vlmkit::linear_bf16 needs at least one weight");
  std::vector<at::TensorList> parts;
  for (const at::Tensor& w : weights) parts.emplace_back(w);
  const at::Tensor out = rounded(products(input, parts, biases, "vlmkit::linear_bf16"), input.scalar_type());
  std::vector<at::Tensor> outputs;
  std::vector<int64_t> shape = input.sizes().vec();
  int64_t column = 0;
  for (const at::Tensor& w : weights) {
    shape.back() = w.size(0);
    outputs.push_back(out.narrow(1, column, w.size(0)).view(shape));
    column += w.size(0);
  }
  return outputs;
}

// y = (x @ q.T) * scale + bias for int8 weights q [N, K] with one scale per output row.
at::Tensor linear_int8(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  const std::vector<at::Tensor> parts{weight, scale};
  return shaped_like(products(input, {parts}, optional_bias(bias), "vlmkit::linear_int8"), input);
}

// y = x @ W^T (+ b) for 4-bit weights stored as vlmkit saves them (products.h).
at::Tensor linear_int4(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& zero, const std::optional<at::Tensor>& bias) {
  const std::vector<at::Tensor> parts{weight, scale, zero};
  return shaped_like(products(input, {parts}, optional_bias(bias), "vlmkit::linear_int4"), input);
}

// The float32 weight [N, K] of linear_int4's operands, for many-row products (prefill), which widen a
// block of rows at a time and run the float GEMM: a table of the 16 values per group.
at::Tensor dequantize_int4(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.device().is_cpu() &&
                  scale.dim() == 2 && scale.size(0) == weight.size(0) && zero.sizes() == scale.sizes() &&
                  weight.size(1) * 2 % scale.size(1) == 0 && (weight.size(1) * 2 / scale.size(1)) % 2 == 0,
              "vlmkit::dequantize_int4: weight uint8 [N, K / 2] on the CPU, scale and zero [N, K / G]");
  const int64_t N = weight.size(0), K = weight.size(1) * 2, groups = scale.size(1), G = K / groups;
  at::Tensor w = weight.contiguous(), s = scale.to(at::kFloat).contiguous(), z = zero.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({N, K}, s.options());
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const float *sp = s.const_data_ptr<float>(), *zp = z.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kRowsPerChunk = 16;
  parallel_chunks_on_torch_threads((N + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    float table[16];
    for (int64_t r = chunk * kRowsPerChunk; r < std::min(N, (chunk + 1) * kRowsPerChunk); ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        for (int q = 0; q < 16; ++q) table[q] = static_cast<float>(q - 8) * sp[r * groups + g] + zp[r * groups + g];
        const uint8_t* bytes = wp + r * (K / 2) + g * (G / 2);
        float* row = op + r * K + g * G;
        for (int64_t j = 0; j < G / 2; ++j) {
          row[2 * j] = table[bytes[j] >> 4];
          row[2 * j + 1] = table[bytes[j] & 15];
        }
      }
    }
  });
  return out;
}

}  // namespace vlmkit
