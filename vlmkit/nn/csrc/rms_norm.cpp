// rms_norm_bf16: RMSNorm of many bf16 rows (a prefill's hidden states) in one pass over them, the twin of
// vlmkit/nn/norms.py's RMSNorm (tests/test_cpu_kernels.py keeps them equal). torch runs the module's
// formula as seven ops, each a pass over the rows with a temporary of their size (two in fp32): on a
// 705 x 2048 prefill that took 4 ms a norm, 0.2 s of a Janus-Pro-1B first token.
//
// The arithmetic is the module's: fp32 mean of squares, x * rsqrt(mean + eps) rounded to bf16, times the
// weight, rounded again; only the order of the sum of squares differs.
#include <ATen/ops/empty.h>

#include <cmath>

#include "ops.h"
#include "products.h"
#include "work_pool.h"

namespace vlmkit {
namespace {

constexpr int64_t kRowsPerChunk = 8;


void rms_norm_row(const BFloat16* x, int64_t D, const BFloat16* weight, float eps, BFloat16* out) {
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m256 a = load_bf16x8(x + d), b = load_bf16x8(x + d + 8);
    even = _mm256_fmadd_ps(a, a, even);
    odd = _mm256_fmadd_ps(b, b, odd);
  }
  for (; d + 8 <= D; d += 8) {
    const __m256 a = load_bf16x8(x + d);
    even = _mm256_fmadd_ps(a, a, even);
  }
  float squares = horizontal_sum(_mm256_add_ps(even, odd));
  for (; d < D; ++d) squares += static_cast<float>(x[d]) * static_cast<float>(x[d]);
  const float inverse = 1.f / std::sqrt(squares / static_cast<float>(D) + eps);
  const __m256 scale = _mm256_set1_ps(inverse);
  for (d = 0; d + 8 <= D; d += 8) {
    const __m128i result = rms_normed_bf16x8(load_bf16x8(x + d), load_bf16x8(weight + d), scale);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + d), result);
  }
  for (; d < D; ++d) {
    out[d] = static_cast<BFloat16>(static_cast<float>(weight[d]) * bf16_round(static_cast<float>(x[d]) * inverse));
  }
}

}  // namespace

// x [..., D] bf16, weight [D] bf16: weight * bf16(x * rsqrt(mean(x^2) + eps)), bf16, the shape of x.
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "vlmkit::rms_norm_bf16";
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, op, " takes bf16 tensors");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight [D] for x [..., D]");
  const at::Tensor input = x.contiguous(), w = weight.contiguous();
  const int64_t D = input.size(-1), rows = D == 0 ? 0 : input.numel() / D;
  at::Tensor out = at::empty(input.sizes(), input.options());
  const BFloat16* xp = input.const_data_ptr<BFloat16>();
  const BFloat16* wp = w.const_data_ptr<BFloat16>();
  BFloat16* result = out.data_ptr<BFloat16>();
  const float epsilon = static_cast<float>(eps);
  parallel_chunks_on_torch_threads((rows + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    for (int64_t r = chunk * kRowsPerChunk; r < std::min(rows, (chunk + 1) * kRowsPerChunk); ++r) {
      rms_norm_row(xp + r * D, D, wp, epsilon, result + r * D);
    }
  });
  return out;
}

}  // namespace vlmkit
