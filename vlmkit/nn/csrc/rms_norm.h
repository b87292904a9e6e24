// RMSNorm of one row as the references compute it (nn/norms.py's RMSNorm): fp32 mean of squares,
// x * rsqrt(mean + eps) rounded to bf16, times the weight, rounded again; only the order of the sum of
// squares differs. The prefill norm (rms_norm.cpp, bf16 rows) and the decode step (decode_step.cpp, fp32
// rows holding bf16 values) share it.
#pragma once

#include <cmath>

#include "products.h"

namespace vlmkit {

// x: D values, bf16 or fp32; out: the D normed values, bf16 or fp32 holding bf16 values.
template <typename In, typename Out>
inline void rms_norm_row(const In* x, int64_t D, const BFloat16* weight, float eps, Out* out) {
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m256 a = load8(x + d), b = load8(x + d + 8);
    even = _mm256_fmadd_ps(a, a, even);
    odd = _mm256_fmadd_ps(b, b, odd);
  }
  for (; d + 8 <= D; d += 8) {
    const __m256 a = load8(x + d);
    even = _mm256_fmadd_ps(a, a, even);
  }
  float squares = horizontal_sum(_mm256_add_ps(even, odd));
  for (; d < D; ++d) squares += static_cast<float>(x[d]) * static_cast<float>(x[d]);
  const float inverse = 1.f / std::sqrt(squares / static_cast<float>(D) + eps);
  const __m256 scale = _mm256_set1_ps(inverse);
  for (d = 0; d + 8 <= D; d += 8) {
    const __m128i normed = round_to_bf16x8(_mm256_mul_ps(load8(x + d), scale));
    store8(out + d, round_to_bf16x8(_mm256_mul_ps(load_bf16x8(weight + d), widen_bf16x8(normed))));
  }
  for (; d < D; ++d) {
    const float normed = bf16_round(static_cast<float>(x[d]) * inverse);
    out[d] = static_cast<Out>(static_cast<BFloat16>(static_cast<float>(weight[d]) * normed));
  }
}

}  // namespace vlmkit
