// The row kernels of weights_product (products.cpp) for CPUs with AVX-512 BF16 and VNNI, chosen at run
// time (set_kernel_isa): the same weights and activations, more multiply-adds per instruction, so a
// step with several activation rows (CFG pairs, batches) stays memory-bound where the AVX2 kernels
// become compute-bound; with one row too, fewer instructions per weight byte stream faster.
//
// bf16 weights: vdpbf16ps multiplies 32 weight/activation pairs per instruction (the activations are
// bf16 values already: the layer step and linear_bf16 round them as torch does). int8 weights: widened
// to int16 and multiplied against the int16 activations by vpdpwssd. 4-bit weights: the bare values
// 0..15 against the int8 activations by vpdpbusd, 64 per instruction.
//
// Only functions marked VLMKIT_AVX512 use these instructions: every header is included before them, so
// no inline function shared with the other files is compiled for AVX-512 (which would crash an AVX2 CPU
// wherever the linker picked that copy).
#include "products.h"

#include <algorithm>
#include <array>

#if defined(VLMKIT_EMULATED_AVX512)  // after every other header: its macros stand for the AVX-512 intrinsics
#include "emulated_avx512.h"
#endif

namespace vlmkit {

bool avx512_kernels_run_here() {
#if defined(VLMKIT_EMULATED_AVX512)
  return true;  // emulated: any CPU with AVX2 runs them
#elif VLMKIT_HAVE_AVX512
  // The CPU's own answer (CPUID, and the OS saving the AVX-512 registers), whatever the caller was told of
  // it: the instructions on a CPU without them would end the process.
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

#if VLMKIT_HAVE_AVX512
namespace {

constexpr int64_t kIntBlock = 4096;  // int32 lanes take 128 steps of at most 2 * 127 * 32767

// Lanes [0, count) of a 32-lane (16-bit) or 64-lane (8-bit) load; the rest zero, so tails need no scalar loop.
VLMKIT_AVX512 inline __mmask32 mask32(int64_t count) {
  return count >= 32 ? ~__mmask32(0) : (__mmask32(1) << count) - 1;
}

VLMKIT_AVX512 inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

// Weight rows [r0, r0 + WR) against activation rows [0, XR): a WR x XR tile of accumulators, so each
// activation vector loaded serves WR weight rows and each weight vector XR activation rows (with one
// weight row at a time, several activation rows would be re-read from cache for every weight row).
// Small tiles keep S sums per output, over alternate 32-input chunks: vdpbf16ps waits about 6 cycles for
// the sum it adds to, so a single chain per output capped a one-row product at 64 weight bytes per 6
// cycles a core (~80 GB/s on 2 cores, below what the memory gave when the machine was quiet).
template <int WR, int XR>
VLMKIT_AVX512 void bf16_tile(const BFloat16* x, int64_t K, const BFloat16* w, int64_t r0, float* y, int64_t N) {
  constexpr int S = WR * XR >= 4 ? 1 : 4 / (WR * XR);
  __m512 acc[S][WR][XR];
  for (int s = 0; s < S; ++s) {
    for (int i = 0; i < WR; ++i) {
      for (int b = 0; b < XR; ++b) acc[s][i][b] = _mm512_setzero_ps();
    }
  }
  const BFloat16* wr = w + r0 * K;
  int64_t k = 0;
  for (; k + 32 * S <= K; k += 32 * S) {
    for (int s = 0; s < S; ++s) {
      const int64_t ks = k + 32 * s;
      __m512bh xv[XR];
      for (int b = 0; b < XR; ++b) xv[b] = as_bh(_mm512_loadu_si512(x + b * K + ks));
      for (int i = 0; i < WR; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + i * K + ks) + kPrefetchBytes, _MM_HINT_T0);
        const __m512bh wv = as_bh(_mm512_loadu_si512(wr + i * K + ks));
        for (int b = 0; b < XR; ++b) acc[s][i][b] = _mm512_dpbf16_ps(acc[s][i][b], wv, xv[b]);
      }
    }
  }
  for (; k < K; k += 32) {  // the last chunks, the final one partial (masked loads are slower: only here)
    const __mmask32 m = mask32(K - k);
    __m512bh xv[XR];
    for (int b = 0; b < XR; ++b) xv[b] = as_bh(_mm512_maskz_loadu_epi16(m, x + b * K + k));
    for (int i = 0; i < WR; ++i) {
      const __m512bh wv = as_bh(_mm512_maskz_loadu_epi16(m, wr + i * K + k));
      for (int b = 0; b < XR; ++b) acc[0][i][b] = _mm512_dpbf16_ps(acc[0][i][b], wv, xv[b]);
    }
  }
  for (int i = 0; i < WR; ++i) {
    for (int b = 0; b < XR; ++b) {
      __m512 sum = acc[0][i][b];
      for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][i][b]);
      y[b * N + r0 + i] = _mm512_reduce_add_ps(sum);
    }
  }
}

using Bf16Tile = void (*)(const BFloat16*, int64_t, const BFloat16*, int64_t, float*, int64_t);
template <int WR>
constexpr std::array<Bf16Tile, 4> kBf16TilesOf{&bf16_tile<WR, 1>, &bf16_tile<WR, 2>, &bf16_tile<WR, 3>,
                                               &bf16_tile<WR, 4>};
constexpr std::array<std::array<Bf16Tile, 4>, 4> kBf16Tiles{kBf16TilesOf<1>, kBf16TilesOf<2>, kBf16TilesOf<3>,
                                                            kBf16TilesOf<4>};

template <int ROWS_X>
VLMKIT_AVX512 void int8_block(const int16_t* x, const float* x_scale, int64_t K, const PackedWeight& weight,
                              int64_t row, int64_t rows, float* y, int64_t N) {
  for (int64_t r = row; r < row + rows; ++r) {
    const int8_t* wr = static_cast<const int8_t*>(weight.data) + r * K;
    __m512 total[ROWS_X];
    for (int b = 0; b < ROWS_X; ++b) total[b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K;) {
      const int64_t end = std::min(K, k + kIntBlock);
      __m512i acc[ROWS_X];
      for (int b = 0; b < ROWS_X; ++b) acc[b] = _mm512_setzero_si512();
      for (; k + 32 <= end; k += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + k + kPrefetchBytes), _MM_HINT_T0);
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k)));
        for (int b = 0; b < ROWS_X; ++b) acc[b] = _mm512_dpwssd_epi32(acc[b], wv, _mm512_loadu_si512(x + b * K + k));
      }
      if (k < end) {  // the last, partial 32 inputs of the row
        const __mmask32 m = mask32(end - k);
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, wr + k));
        for (int b = 0; b < ROWS_X; ++b) {
          acc[b] = _mm512_dpwssd_epi32(acc[b], wv, _mm512_maskz_loadu_epi16(m, x + b * K + k));
        }
        k = end;
      }
      for (int b = 0; b < ROWS_X; ++b) total[b] = _mm512_add_ps(total[b], _mm512_cvtepi32_ps(acc[b]));
    }
    for (int b = 0; b < ROWS_X; ++b) y[b * N + r] = _mm512_reduce_add_ps(total[b]) * x_scale[b] * weight.scale_at(r);
  }
}

// One span of 4-bit weights (WIDE: 32 bytes, 64 inputs; else 16 bytes, 32 inputs) as 64 (or 32, zero
// padded) unsigned bytes in the activations' span order: the high nibbles (even inputs), then the low.
template <bool WIDE>
VLMKIT_AVX512 inline __m512i span_values(const uint8_t* bytes) {
  if (WIDE) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)), low = _mm256_set1_epi8(15);
    const __m256i even = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low), odd = _mm256_and_si256(packed, low);
    return _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1);
  }
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)), low = _mm_set1_epi8(15);
  const __m256i values = _mm256_set_m128i(_mm_and_si128(packed, low), _mm_and_si128(_mm_srli_epi16(packed, 4), low));
  return _mm512_zextsi256_si512(values);
}

template <bool WIDE>
VLMKIT_AVX512 inline __m512i span_activations(const int8_t* xk) {
  if (WIDE) return _mm512_loadu_si512(xk);
  return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk)));
}

// Per group the sum is s * sum(q x) + (z - 8 s) * sum(x), as in the AVX2 kernel.
template <int ROWS_X, bool WIDE, typename Scale>
VLMKIT_AVX512 void int4_block(const GroupActivationsView& x, const PackedWeight& weight, int64_t row, int64_t rows,
                              float* y, int64_t N) {
  const int64_t K = weight.K, G = weight.G, groups = K / G, span = WIDE ? 64 : 32;
  const Scale* scales = static_cast<const Scale*>(weight.scales());
  const Scale* zeros = static_cast<const Scale*>(weight.zeros());
  for (int64_t r = row; r < row + rows; ++r) {
    const uint8_t* bytes = static_cast<const uint8_t*>(weight.data) + r * (K / 2);
    const int8_t* xk = x.values;
    __m512 total[ROWS_X];
    float offset[ROWS_X];
    for (int b = 0; b < ROWS_X; ++b) {
      total[b] = _mm512_setzero_ps();
      offset[b] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m512i acc[ROWS_X];
      for (int b = 0; b < ROWS_X; ++b) acc[b] = _mm512_setzero_si512();
      for (const uint8_t* group_end = bytes + G / 2; bytes < group_end; bytes += span / 2, xk += span) {
        _mm_prefetch(reinterpret_cast<const char*>(bytes + kPrefetchBytes), _MM_HINT_T0);
        const __m512i values = span_values<WIDE>(bytes);
        for (int b = 0; b < ROWS_X; ++b) acc[b] = _mm512_dpbusd_epi32(acc[b], values, span_activations<WIDE>(xk + b * K));
      }
      const float s = static_cast<float>(scales[r * groups + g]), z = static_cast<float>(zeros[r * groups + g]);
      for (int b = 0; b < ROWS_X; ++b) {
        total[b] = _mm512_fmadd_ps(_mm512_set1_ps(s * x.scale[b * groups + g]), _mm512_cvtepi32_ps(acc[b]), total[b]);
        offset[b] += (z - 8.f * s) * x.group_sums[b * groups + g];
      }
    }
    for (int b = 0; b < ROWS_X; ++b) y[b * N + r] = _mm512_reduce_add_ps(total[b]) + offset[b];
  }
}

}  // namespace

// Up to five activation rows (a text step, a CFG image step, small batches) stream one weight row at a time:
// against tiles of four weight rows read side by side, a single sequential stream per thread is faster.
// Janus-Pro-1B layer weights on 2 Zen 4 cores, products split in per-thread runs, in one process with the
// variants' order rotating: 3 rows 40-43 against 32-34 GB/s, 4 rows 34-39 against 28-32, 5 rows 29 against
// 24; from six rows on, where the weights are read in more than one pass, the tiles' fewer loads per
// multiply-add pay (7 rows 17-19 against 15 GB/s).
void avx512_bf16_rows(const BFloat16* x, int64_t B, int64_t K, const BFloat16* w, int64_t row, int64_t rows, float* y,
                      int64_t N) {
  const int64_t tile_rows = B <= 5 ? 1 : 4;
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const int64_t xr = std::min<int64_t>(4, B - b0);
    for (int64_t r = row; r < row + rows; r += tile_rows) {
      kBf16Tiles[std::min<int64_t>(tile_rows, row + rows - r) - 1][xr - 1](x + b0 * K, K, w, r, y + b0 * N, N);
    }
  }
}

void avx512_int8_rows(const int16_t* x, const float* x_scale, int64_t B, const PackedWeight& weight, int64_t row,
                      int64_t rows, float* y, int64_t N) {
  in_row_blocks(B, [&](int64_t b0, auto count) {
    int8_block<decltype(count)::value>(x + b0 * weight.K, x_scale + b0, weight.K, weight, row, rows, y + b0 * N, N);
  });
}

void avx512_int4_rows(const GroupActivationsView& x, int64_t span, int64_t B, const PackedWeight& weight, int64_t row,
                      int64_t rows, float* y, int64_t N) {
  const int64_t groups = weight.K / weight.G;
  with_int4_layout(span, weight.bf16_scales, [&](auto wide, auto scale) {
    in_row_blocks(B, [&](int64_t b0, auto count) {
      int4_block<decltype(count)::value, decltype(wide)::value, decltype(scale)>(
          rows_from(x, b0, weight.K, groups), weight, row, rows, y + b0 * N, N);
    });
  });
}

#else  // a compiler without AVX-512 BF16 support: set_kernel_isa never selects these

void avx512_bf16_rows(const BFloat16*, int64_t, int64_t, const BFloat16*, int64_t, int64_t, float*, int64_t) {}
void avx512_int8_rows(const int16_t*, const float*, int64_t, const PackedWeight&, int64_t, int64_t, float*, int64_t) {}
void avx512_int4_rows(const GroupActivationsView&, int64_t, int64_t, const PackedWeight&, int64_t, int64_t, float*,
                      int64_t) {}

#endif

}  // namespace vlmkit
