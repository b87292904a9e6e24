// The row kernels of weights_product (products.cpp) for every x86 CPU with AVX2 and FMA: bf16 weight rows
// widened to fp32 in registers against fp32 activations; int8 weights widened to int16 and multiplied
// against the int16 activations by vpmaddwd (16 pairs an instruction); 4-bit weights, the bare values 0..15,
// against the int8 activations by vpmaddubsw (32 an instruction). The bf16 and int8 rows are read in
// streams (in_streams), the 4-bit ones one at a time, prefetched.
#include "products.h"

#include <algorithm>
#include <type_traits>

namespace vlmkit {
namespace {

constexpr int64_t kIntBlock = 2048;  // int32 lanes take 128 steps of at most 2 * 127 * 32767

// Weight rows first, first + stride, ... (STREAMS of them) against ROWS_X activation rows; writes fp32
// sums to y. Each activation vector loaded serves every weight row of the pass, and each output keeps A
// sums over alternate 8-input chunks so that the multiply-adds do not wait on each other.
template <int ROWS_X, int STREAMS>
void rows_together(const float* x, int64_t K, const BFloat16* w, int64_t first, int64_t stride, float* y, int64_t N) {
  constexpr int A = std::min(4, std::max(1, 8 / (ROWS_X * STREAMS)));
  const BFloat16* wr[STREAMS];
  for (int i = 0; i < STREAMS; ++i) wr[i] = w + (first + i * stride) * K;
  __m256 acc[A][STREAMS][ROWS_X];
  for (int a = 0; a < A; ++a) {
    for (int i = 0; i < STREAMS; ++i) {
      for (int b = 0; b < ROWS_X; ++b) acc[a][i][b] = _mm256_setzero_ps();
    }
  }
  int64_t k = 0;
  for (; k + 8 * A <= K; k += 8 * A) {
    for (int a = 0; a < A; ++a) {
      __m256 xv[ROWS_X];
      for (int b = 0; b < ROWS_X; ++b) xv[b] = _mm256_loadu_ps(x + b * K + k + 8 * a);
      for (int i = 0; i < STREAMS; ++i) {
        const __m256 wv = load_bf16x8(wr[i] + k + 8 * a);
        for (int b = 0; b < ROWS_X; ++b) acc[a][i][b] = _mm256_fmadd_ps(wv, xv[b], acc[a][i][b]);
      }
    }
  }
  for (; k + 8 <= K; k += 8) {
    for (int i = 0; i < STREAMS; ++i) {
      const __m256 wv = load_bf16x8(wr[i] + k);
      for (int b = 0; b < ROWS_X; ++b) acc[0][i][b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * K + k), acc[0][i][b]);
    }
  }
  for (int i = 0; i < STREAMS; ++i) {
    for (int b = 0; b < ROWS_X; ++b) {
      __m256 total = acc[0][i][b];
      for (int a = 1; a < A; ++a) total = _mm256_add_ps(total, acc[a][i][b]);
      float sum = horizontal_sum(total);
      for (int64_t kk = k; kk < K; ++kk) sum += static_cast<float>(wr[i][kk]) * x[b * K + kk];
      y[b * N + first + i * stride] = sum;
    }
  }
}

// Rows [row, row + rows) cut into STREAMS runs read side by side, so each core keeps several sequential
// streams of weights in flight: together(streams, first, stride) computes rows first, first + stride, ...
// (streams of them), and rows left over go one at a time. On 2 Zen 3 cores (2026-12-07) four streams read
// bf16 rows of 896-5632 inputs at 29-33 GB/s where one row after another read 20-24 and a plain
// one-stream sum 25-30; rows read side by side as neighbours (four short streams that keep jumping) were
// slower than one at a time for rows of 896 inputs.
template <int STREAMS, typename Together>
inline void in_streams(int64_t row, int64_t rows, const Together& together) {
  const int64_t per_stream = rows / STREAMS;
  for (int64_t j = 0; j < per_stream; ++j) together(std::integral_constant<int, STREAMS>(), row + j, per_stream);
  for (int64_t r = row + STREAMS * per_stream; r < row + rows; ++r) {
    together(std::integral_constant<int, 1>(), r, int64_t{0});
  }
}

// How many streams a kernel reads with ROWS_X activation rows: four, and two for four rows, to keep the
// sums in registers (there bf16 rows read 26 GB/s for three activation rows in four streams, 20-22 for four
// in two or four).
template <int ROWS_X>
constexpr int kStreams = ROWS_X <= 3 ? 4 : 2;

template <int ROWS_X>
void rows_in_streams(const float* x, int64_t K, const BFloat16* w, int64_t row, int64_t rows, float* y, int64_t N) {
  in_streams<kStreams<ROWS_X>>(row, rows, [&](auto streams, int64_t first, int64_t stride) {
    rows_together<ROWS_X, decltype(streams)::value>(x, K, w, first, stride, y, N);
  });
}

inline __m256i load_256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Weight rows first, first + stride, ... (STREAMS of them) against ROWS_X activation rows (in streams, a
// Janus-Pro-1B int8 decode step took 51 ms where one row after another took 62, 2 Zen 3 cores).
template <int ROWS_X, int STREAMS>
void int8_together(const int16_t* xv, const float* x_scale, const PackedWeight& weight, int64_t first, int64_t stride,
                   float* y, int64_t N) {
  const int64_t K = weight.K, vector_end = K - K % 16;
  const int8_t* wr[STREAMS];
  __m256 total[STREAMS][ROWS_X];
  for (int i = 0; i < STREAMS; ++i) {
    wr[i] = static_cast<const int8_t*>(weight.data) + (first + i * stride) * K;
    for (int b = 0; b < ROWS_X; ++b) total[i][b] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  while (k < vector_end) {
    const int64_t end = std::min(vector_end, k + kIntBlock);
    __m256i acc[STREAMS][ROWS_X];
    for (int i = 0; i < STREAMS; ++i) {
      for (int b = 0; b < ROWS_X; ++b) acc[i][b] = _mm256_setzero_si256();
    }
    for (; k < end; k += 16) {
      __m256i xk[ROWS_X];
      for (int b = 0; b < ROWS_X; ++b) xk[b] = load_256(xv + b * K + k);
      for (int i = 0; i < STREAMS; ++i) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[i] + k)));
        for (int b = 0; b < ROWS_X; ++b) acc[i][b] = _mm256_add_epi32(acc[i][b], _mm256_madd_epi16(wv, xk[b]));
      }
    }
    for (int i = 0; i < STREAMS; ++i) {
      for (int b = 0; b < ROWS_X; ++b) total[i][b] = _mm256_add_ps(total[i][b], _mm256_cvtepi32_ps(acc[i][b]));
    }
  }
  for (int i = 0; i < STREAMS; ++i) {
    const int64_t r = first + i * stride;
    for (int b = 0; b < ROWS_X; ++b) {
      float sum = horizontal_sum(total[i][b]);
      for (int64_t kk = vector_end; kk < K; ++kk) sum += static_cast<float>(wr[i][kk]) * xv[b * K + kk];
      y[b * N + r] = sum * x_scale[b] * weight.scale_at(r);
    }
  }
}

template <int ROWS_X>
void int8_rows(const int16_t* x, const float* x_scale, const PackedWeight& weight, int64_t row, int64_t rows, float* y,
               int64_t N) {
  in_streams<kStreams<ROWS_X>>(row, rows, [&](auto streams, int64_t first, int64_t stride) {
    int8_together<ROWS_X, decltype(streams)::value>(x, x_scale, weight, first, stride, y, N);
  });
}

// One span of 4-bit weights (WIDE: 32 bytes, 64 inputs; else 16 bytes, 32 inputs) against ROWS_X rows of
// int8 activations, added to acc as int32 (a span's pair sums stay far inside int16: 2 * 2 * 15 * 127).
template <int ROWS_X, bool WIDE>
inline void nibble_span(const uint8_t* bytes, const int8_t* xk, int64_t K, __m256i* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (WIDE) {
    const __m256i packed = load_256(bytes), low = _mm256_set1_epi8(15);
    const __m256i even = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low), odd = _mm256_and_si256(packed, low);
    for (int b = 0; b < ROWS_X; ++b) {
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(even, load_256(xk + b * K)),
                                             _mm256_maddubs_epi16(odd, load_256(xk + b * K + 32)));
      acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(pairs, ones));
    }
  } else {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)), low = _mm_set1_epi8(15);
    const __m256i values = _mm256_set_m128i(_mm_and_si128(packed, low), _mm_and_si128(_mm_srli_epi16(packed, 4), low));
    for (int b = 0; b < ROWS_X; ++b) {
      acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(_mm256_maddubs_epi16(values, load_256(xk + b * K)), ones));
    }
  }
}

// 4-bit rows: per group the sum is s * sum(q x) + (z - 8 s) * sum(x), so the inner loop multiplies the
// bare values 0..15. One row at a time, prefetched: with more arithmetic per weight byte than the others,
// they read no faster in two or four streams (Janus-Pro-1B 4-bit decode steps 33-35 ms either way on 2 Zen 3
// cores, 2026-12-07).
template <int ROWS_X, bool WIDE, typename Scale>
void int4_rows(const GroupActivationsView& x, const PackedWeight& weight, int64_t row, int64_t rows, float* y,
               int64_t N) {
  const int64_t K = weight.K, G = weight.G, groups = K / G, span = WIDE ? 64 : 32;
  const Scale* scales = static_cast<const Scale*>(weight.scales());
  const Scale* zeros = static_cast<const Scale*>(weight.zeros());
  const int8_t* xv = x.values;
  const float* x_scale = x.scale;
  const float* group_sums = x.group_sums;
  for (int64_t r = row; r < row + rows; ++r) {
    const uint8_t* bytes = static_cast<const uint8_t*>(weight.data) + r * (K / 2);
    const int8_t* xk = xv;
    __m256 total[ROWS_X];
    float offset[ROWS_X];
    for (int b = 0; b < ROWS_X; ++b) {
      total[b] = _mm256_setzero_ps();
      offset[b] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m256i acc[ROWS_X];
      for (int b = 0; b < ROWS_X; ++b) acc[b] = _mm256_setzero_si256();
      for (const uint8_t* group_end = bytes + G / 2; bytes < group_end; bytes += span / 2, xk += span) {
        _mm_prefetch(reinterpret_cast<const char*>(bytes + kPrefetchBytes), _MM_HINT_T0);
        nibble_span<ROWS_X, WIDE>(bytes, xk, K, acc);
      }
      const float s = static_cast<float>(scales[r * groups + g]), z = static_cast<float>(zeros[r * groups + g]);
      for (int b = 0; b < ROWS_X; ++b) {
        total[b] = _mm256_fmadd_ps(_mm256_set1_ps(s * x_scale[b * groups + g]), _mm256_cvtepi32_ps(acc[b]), total[b]);
        offset[b] += (z - 8.f * s) * group_sums[b * groups + g];
      }
    }
    for (int b = 0; b < ROWS_X; ++b) y[b * N + r] = horizontal_sum(total[b]) + offset[b];
  }
}

}  // namespace

void avx2_bf16_rows(const float* x, int64_t B, int64_t K, const BFloat16* w, int64_t row, int64_t rows, float* y,
                    int64_t N) {
  in_row_blocks(B, [&](int64_t b0, auto count) {
    rows_in_streams<decltype(count)::value>(x + b0 * K, K, w, row, rows, y + b0 * N, N);
  });
}

void avx2_int8_rows(const int16_t* x, const float* x_scale, int64_t B, const PackedWeight& weight, int64_t row,
                    int64_t rows, float* y, int64_t N) {
  in_row_blocks(B, [&](int64_t b0, auto count) {
    int8_rows<decltype(count)::value>(x + b0 * weight.K, x_scale + b0, weight, row, rows, y + b0 * N, N);
  });
}

void avx2_int4_rows(const GroupActivationsView& x, int64_t span, int64_t B, const PackedWeight& weight, int64_t row,
                    int64_t rows, float* y, int64_t N) {
  const int64_t groups = weight.K / weight.G;
  with_int4_layout(span, weight.bf16_scales, [&](auto wide, auto scale) {
    in_row_blocks(B, [&](int64_t b0, auto count) {
      int4_rows<decltype(count)::value, decltype(wide)::value, decltype(scale)>(
          rows_from(x, b0, weight.K, groups), weight, row, rows, y + b0 * N, N);
    });
  });
}

}  // namespace vlmkit
