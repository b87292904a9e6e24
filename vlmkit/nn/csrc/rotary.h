// Rotary position embedding of one head's row as the Python modules compute it (nn/rotary.py's rotate):
// x * cos + rotate_half(x) * sin, with torch's bf16 rounding of each product and of the sum.
#pragma once

#include "products.h"

namespace vlmkit {

// x: one head's hd values, bf16 or fp32 holding bf16 values (the decode step's projections); cos, sin: its
// position's hd values.
template <typename T>
inline void rotate(const T* x, const BFloat16* cos, const BFloat16* sin, int64_t hd, BFloat16* out) {
  const int64_t half = hd / 2;
  if (half % 8 == 0) {
    for (int64_t i = 0; i < hd; i += 8) {
      const __m256 turned = i < half ? _mm256_xor_ps(_mm256_set1_ps(-0.f), load8(x + i + half)) : load8(x + i - half);
      const __m256 straight = widen_bf16x8(round_to_bf16x8(_mm256_mul_ps(load8(x + i), load_bf16x8(cos + i))));
      const __m256 across = widen_bf16x8(round_to_bf16x8(_mm256_mul_ps(turned, load_bf16x8(sin + i))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), round_to_bf16x8(_mm256_add_ps(straight, across)));
    }
    return;
  }
  for (int64_t i = 0; i < hd; ++i) {
    const float turned = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    out[i] = static_cast<BFloat16>(bf16_round(static_cast<float>(x[i]) * static_cast<float>(cos[i])) +
                                   bf16_round(turned * static_cast<float>(sin[i])));
  }
}

}  // namespace vlmkit
