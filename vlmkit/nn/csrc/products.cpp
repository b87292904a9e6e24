// weights_product (products.h): bf16, int8 and 4-bit weight rows streamed against a few activation rows.
#include "products.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

#include "work_pool.h"

namespace vlmkit {
namespace {

constexpr int64_t kRowsPerBlock = 4;
constexpr int64_t kBlocksPerChunk = 16;

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

void rows_product(const float* x, int64_t B, int64_t K, const BFloat16* w, int64_t row, int64_t rows, float* y,
                  int64_t N) {
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const float* xb = x + b0 * K;
    float* yb = y + b0 * N;
    switch (std::min<int64_t>(4, B - b0)) {
      case 1: rows_in_streams<1>(xb, K, w, row, rows, yb, N); break;
      case 2: rows_in_streams<2>(xb, K, w, row, rows, yb, N); break;
      case 3: rows_in_streams<3>(xb, K, w, row, rows, yb, N); break;
      default: rows_in_streams<4>(xb, K, w, row, rows, yb, N); break;
    }
  }
}

// Quantized weights multiply integers, so a weight needs no widening to fp32: the activations are rounded
// once per product and the integer sums turned to fp32 before they could overflow.
//
// int8 weights: each activation row rounded to int16 with one scale (15 bits against bf16's 8, no more
// error than the bf16 activations already carry); vpmaddwd multiplies 16 weight/activation pairs and
// adds neighbours in one instruction.
constexpr int64_t kIntBlock = 2048;  // int32 lanes take 128 steps of at most 2 * 127 * 32767

// The largest |v| of row [0, n), and whether every value is finite; 8 at a time (a scalar pass per product
// cost about 1.5 ns a value: 7 us of an int8 product over a 4864-wide input, more than its 16 weight rows).
struct Magnitude {
  float top;
  bool finite;
};
inline Magnitude magnitude(const float* row, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 top = _mm256_setzero_ps(), not_finite = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(row + k), abs_mask);
    not_finite = _mm256_or_ps(not_finite, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf, or NaN (unordered)
    top = _mm256_max_ps(top, a);
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  Magnitude result{_mm_cvtss_f32(m), _mm256_movemask_ps(not_finite) == 0};
  for (; k < n; ++k) {
    result.finite = result.finite && std::isfinite(row[k]);
    result.top = std::max(result.top, std::fabs(row[k]));
  }
  return result;
}

// A row's scale for integers up to `largest`: |x| max / largest, 1 for an all-zero row, and NaN for a row with
// inf or NaN (its products are then NaN, as float ones would be).
inline float integer_scale(const Magnitude& m, float largest) {
  if (!m.finite) return std::numeric_limits<float>::quiet_NaN();
  return m.top > 0.f ? m.top / largest : 1.f;
}

// value * inverse to the nearest integer (ties to even, as lrint and vcvtps2dq both round), 8 at a time into
// int32, or one at a time; for finite rows only (a row that is not finite keeps its zeros).
inline __m256i rounded8(const float* values, __m256 inverse) {
  return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(values), inverse));
}
inline int32_t rounded(float value, float inverse) { return static_cast<int32_t>(std::lrint(value * inverse)); }

struct Int16Activations {
  Int16Activations(const float* x, int64_t B, int64_t K) : values(B * K), scale(B) {
    for (int64_t b = 0; b < B; ++b) {
      const float* row = x + b * K;
      int16_t* out = values.data() + b * K;
      scale[b] = integer_scale(magnitude(row, K), 32767.f);
      if (std::isnan(scale[b])) continue;  // values stay 0
      const float inverse = 1.f / scale[b];
      const __m256 inverse8 = _mm256_set1_ps(inverse);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        // packs interleaves the two 128-bit halves; the permute puts the 16 values back in order
        const __m256i packed = _mm256_packs_epi32(rounded8(row + k, inverse8), rounded8(row + k + 8, inverse8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm256_permute4x64_epi64(packed, 0xD8));
      }
      for (; k < K; ++k) out[k] = static_cast<int16_t>(rounded(row[k], inverse));
    }
  }
  std::vector<int16_t> values;  // [B, K]
  std::vector<float> scale;  // [B]: x ~ values * scale
};

// 4-bit weights: the activations rounded to int8 with a scale per row and weight group (|x| max / 127;
// its rounding error, under 0.4% of the group's largest value, is far below the 4-bit weights' own), so
// vpmaddubsw multiplies 32 weight values 0..15 by 32 activations per instruction. Within each `span` of
// inputs (64, or 32 where groups are not a multiple of 64) the even inputs come first, then the odd
// ones: the high and low nibbles of span / 2 weight bytes.
struct Int8GroupActivations {
  Int8GroupActivations(const float* x, int64_t B, int64_t K, int64_t G)
      : G(G), span(G % 64 == 0 ? 64 : 32), values(B * K), scale(B * (K / G)), group_sums(B * (K / G)) {
    const int64_t groups = K / G;
    std::vector<Magnitude> group_magnitudes(groups);
    for (int64_t b = 0; b < B; ++b) {
      const float* row = x + b * K;
      bool finite = true;  // one value that is not makes the whole row's products NaN
      for (int64_t g = 0; g < groups; ++g) {
        group_magnitudes[g] = magnitude(row + g * G, G);
        finite = finite && group_magnitudes[g].finite;
      }
      for (int64_t g = 0; g < groups; ++g) {
        const float* group = row + g * G;
        const float s = integer_scale({group_magnitudes[g].top, finite}, 127.f);
        scale[b * groups + g] = s;
        if (std::isnan(s)) {
          group_sums[b * groups + g] = s;  // values stay 0
          continue;
        }
        const __m256 inverse = _mm256_set1_ps(1.f / s);
        int8_t* out = values.data() + b * K + g * G;
        int32_t sum = 0;
        for (int64_t first = 0; first < G; first += span) {  // G is a multiple of span
          alignas(32) int32_t q[64];
          for (int64_t i = 0; i < span; i += 8) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(q + i), rounded8(group + first + i, inverse));
          }
          for (int64_t i = 0; i < span / 2; ++i) {
            out[first + i] = static_cast<int8_t>(q[2 * i]);
            out[first + span / 2 + i] = static_cast<int8_t>(q[2 * i + 1]);
            sum += q[2 * i] + q[2 * i + 1];
          }
        }
        group_sums[b * groups + g] = static_cast<float>(sum) * s;
      }
    }
  }
  const int64_t G, span;
  std::vector<int8_t> values;  // [B, K], in span order
  std::vector<float> scale;  // [B, K / G]: x ~ values * scale
  std::vector<float> group_sums;  // [B, K / G]: the sums of the rounded x per group
};

inline __m256i load_256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Weight rows first, first + stride, ... (STREAMS of them) against ROWS_X activation rows (in streams, a
// Janus-Pro-1B int8 decode step took 51 ms where one row after another took 62, 2 Zen 3 cores).
template <int ROWS_X, int STREAMS>
void int8_together(const Int16Activations& x, int64_t b0, const PackedWeight& weight, int64_t first, int64_t stride,
                   float* y, int64_t N) {
  const int64_t K = weight.K, vector_end = K - K % 16;
  const int16_t* xv = x.values.data() + b0 * K;
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
      y[b * N + r] = sum * x.scale[b0 + b] * weight.scale_at(r);
    }
  }
}

template <int ROWS_X>
void int8_rows(const Int16Activations& x, int64_t b0, const PackedWeight& weight, int64_t row, int64_t rows, float* y,
               int64_t N) {
  in_streams<kStreams<ROWS_X>>(row, rows, [&](auto streams, int64_t first, int64_t stride) {
    int8_together<ROWS_X, decltype(streams)::value>(x, b0, weight, first, stride, y, N);
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
void int4_rows(const Int8GroupActivations& x, int64_t b0, const PackedWeight& weight, int64_t row, int64_t rows,
               float* y, int64_t N) {
  const int64_t K = weight.K, G = weight.G, groups = K / G, span = WIDE ? 64 : 32;
  const Scale* scales = static_cast<const Scale*>(weight.scales());
  const Scale* zeros = static_cast<const Scale*>(weight.zeros());
  const int8_t* xv = x.values.data() + b0 * K;
  const float* x_scale = x.scale.data() + b0 * groups;
  const float* group_sums = x.group_sums.data() + b0 * groups;
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

template <typename Activations>
using IntegerRows = void (*)(const Activations&, int64_t, const PackedWeight&, int64_t, int64_t, float*, int64_t);

template <bool WIDE, typename Scale>
constexpr std::array<IntegerRows<Int8GroupActivations>, 4> kInt4Rows{
    &int4_rows<1, WIDE, Scale>, &int4_rows<2, WIDE, Scale>, &int4_rows<3, WIDE, Scale>, &int4_rows<4, WIDE, Scale>};
constexpr std::array<IntegerRows<Int16Activations>, 4> kInt8Rows{&int8_rows<1>, &int8_rows<2>, &int8_rows<3>,
                                                                 &int8_rows<4>};

// The row kernels (by activation rows 1..4) for a weight: static tables, picked without building anything.
const std::array<IntegerRows<Int16Activations>, 4>& row_kernels(const Int16Activations&, const PackedWeight&) {
  return kInt8Rows;
}
const std::array<IntegerRows<Int8GroupActivations>, 4>& row_kernels(const Int8GroupActivations& x,
                                                                    const PackedWeight& weight) {
  if (x.span == 64) return weight.bf16_scales ? kInt4Rows<true, BFloat16> : kInt4Rows<true, float>;
  return weight.bf16_scales ? kInt4Rows<false, BFloat16> : kInt4Rows<false, float>;
}

// Every activation row against rows [row, row + rows) of a quantized weight, four activation rows at a time.
template <typename Activations>
void integer_product(const Activations& x, int64_t B, const PackedWeight& weight, int64_t row, int64_t rows, float* y,
                     int64_t N) {
  const auto& kernels = row_kernels(x, weight);
  for (int64_t b0 = 0; b0 < B; b0 += 4) kernels[std::min<int64_t>(4, B - b0) - 1](x, b0, weight, row, rows, y + b0 * N, N);
}

at::Tensor scale_tensor(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? t.contiguous() : t.to(at::kFloat).contiguous();
}

}  // namespace

PackedWeight::PackedWeight(at::TensorList parts, int64_t K, const char* op) : K(K) {
  TORCH_CHECK(!parts.empty() && parts.size() <= 3, op, ": a weight is {bf16}, {int8, scale} or {uint8, scale, zero}");
  const at::Tensor& w = parts[0];
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), op, ": weights must be contiguous 2-d CPU tensors");
  N = w.size(0);
  data = w.const_data_ptr();
  if (parts.size() == 1) {
    kind = Kind::kBFloat16;
    TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.size(1) == K, op, ": a bf16 weight of width ", K, " expected");
    return;
  }
  scale_ = scale_tensor(parts[1]);
  bf16_scales = scale_.scalar_type() == at::kBFloat16;
  if (parts.size() == 2) {
    kind = Kind::kInt8;
    TORCH_CHECK(w.scalar_type() == at::kChar && w.size(1) == K && scale_.numel() == N, op,
                ": an int8 weight [N, ", K, "] with N scales expected");
  } else {
    kind = Kind::kInt4;
    zero_ = parts[2].to(scale_.scalar_type()).contiguous();
    TORCH_CHECK(w.scalar_type() == at::kByte && w.size(1) * 2 == K && scale_.dim() == 2 && scale_.size(0) == N &&
                    zero_.sizes() == scale_.sizes() && K % scale_.size(1) == 0 && (K / scale_.size(1)) % 32 == 0,
                op, ": a 4-bit weight uint8 [N, ", K, " / 2] with scale and zero [N, K / G], G a multiple of 32, expected");
    G = K / scale_.size(1);
  }
  if (bf16_scales) {
    scale_bf16 = scale_.const_data_ptr<BFloat16>();
    zero_bf16 = zero_.defined() ? zero_.const_data_ptr<BFloat16>() : nullptr;
  } else {
    scale_f32 = scale_.const_data_ptr<float>();
    zero_f32 = zero_.defined() ? zero_.const_data_ptr<float>() : nullptr;
  }
}

PackedWeights::PackedWeights(const std::vector<at::TensorList>& weights, int64_t K, const char* op) {
  for (at::TensorList parts : weights) {
    list.emplace_back(parts, K, op);
    N += list.back().N;
  }
}

namespace {
std::atomic<bool> use_avx512{false};
}  // namespace

bool set_kernel_isa(const std::string& isa) {
  if (isa == "avx2" || (isa == "avx512" && avx512_kernels_run_here())) {
    use_avx512.store(isa == "avx512");
    return true;
  }
  return false;
}

std::string kernel_isa() { return use_avx512.load() ? "avx512" : "avx2"; }

void weights_product(const float* x, int64_t B, int64_t K, const std::vector<PackedWeight>& weights, float* y) {
  const bool avx512 = use_avx512.load(std::memory_order_relaxed);
  std::vector<int64_t> first_block{0}, first_column{0};
  int64_t G = 0;
  for (const PackedWeight& w : weights) {
    first_block.push_back(first_block.back() + (w.N + kRowsPerBlock - 1) / kRowsPerBlock);
    first_column.push_back(first_column.back() + w.N);
    if (w.kind == PackedWeight::Kind::kInt4) {
      TORCH_CHECK(G == 0 || G == w.G, "vlmkit: 4-bit weights that share an input must share their group size");
      G = w.G;
    }
  }
  std::optional<Int16Activations> int8_x;  // rounded once per product, for the kinds present
  std::optional<Int8GroupActivations> int4_x;
  for (const PackedWeight& w : weights) {
    if (w.kind == PackedWeight::Kind::kInt8 && !int8_x) int8_x.emplace(x, B, K);
  }
  if (G > 0) int4_x.emplace(x, B, K, G);
  // bf16 weights on AVX-512 BF16 run the vdpbf16ps kernel for any number of rows (see avx512_bf16_rows); it
  // multiplies bf16 pairs, and x holds bf16 values already
  std::vector<BFloat16> bf16_x;
  if (avx512 && std::any_of(weights.begin(), weights.end(), [](const PackedWeight& w) { return !w.quantized(); })) {
    bf16_x.assign(x, x + B * K);
  }
  const int64_t N = first_column.back(), blocks = first_block.back();
  // The AVX-512 kernels take a weight's rows of one chunk four at a time (the blocks they were measured with on
  // Zen 4), the AVX2 ones all at once (they cut them into streams: in_streams).
  const auto product = [&](const PackedWeight& w, int64_t row, int64_t count, float* out) {
    switch (w.kind) {
      case PackedWeight::Kind::kBFloat16:
        if (avx512) {
          avx512_bf16_rows(bf16_x.data(), B, K, static_cast<const BFloat16*>(w.data), row, count, out, N);
        } else {
          rows_product(x, B, K, static_cast<const BFloat16*>(w.data), row, count, out, N);
        }
        break;
      case PackedWeight::Kind::kInt8:
        if (avx512) {
          avx512_int8_rows(int8_x->values.data(), int8_x->scale.data(), B, w, row, count, out, N);
        } else {
          integer_product(*int8_x, B, w, row, count, out, N);
        }
        break;
      case PackedWeight::Kind::kInt4:
        if (avx512) {
          const GroupActivationsView view{int4_x->values.data(), int4_x->scale.data(), int4_x->group_sums.data()};
          avx512_int4_rows(view, int4_x->span, B, w, row, count, out, N);
        } else {
          integer_product(*int4_x, B, w, row, count, out, N);
        }
        break;
    }
  };
  // in runs: each thread streams its own stretch of the weights (LLaVA-OneVision-0.5B decode steps 6-13% and
  // Janus-Pro-1B's 2-6% faster than with chunks dealt out in turn, 2 Zen 4 cores, AVX-512 and AVX2 kernels)
  parallel_runs((blocks + kBlocksPerChunk - 1) / kBlocksPerChunk, [&](int64_t chunk) {
    size_t which = 0;
    const int64_t end = std::min(blocks, (chunk + 1) * kBlocksPerChunk);
    for (int64_t block = chunk * kBlocksPerChunk; block < end;) {
      while (block >= first_block[which + 1]) ++which;
      const PackedWeight& w = weights[which];
      const int64_t last = std::min(end, first_block[which + 1]);  // this weight's blocks in the chunk end here
      const int64_t row = (block - first_block[which]) * kRowsPerBlock;
      const int64_t rows = std::min((last - first_block[which]) * kRowsPerBlock, w.N) - row;
      float* out = y + first_column[which];  // this weight's outputs start at its first column
      const int64_t rows_per_call = avx512 ? kRowsPerBlock : rows;
      for (int64_t r = row; r < row + rows; r += rows_per_call) {
        product(w, r, std::min(rows_per_call, row + rows - r), out);
      }
      block = last;
    }
  });
}

void round_to_bf16(const float* values, int64_t n, BFloat16* out) {
  constexpr int64_t kChunk = 16384;  // values per task: long runs (a vocabulary's logits) on every thread
  parallel_chunks((n + kChunk - 1) / kChunk, [&](int64_t chunk) {
    const int64_t end = std::min(n, (chunk + 1) * kChunk);
    int64_t i = chunk * kChunk;
    for (; i + 8 <= end; i += 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), round_to_bf16x8(_mm256_loadu_ps(values + i)));
    }
    for (; i < end; ++i) out[i] = static_cast<BFloat16>(values[i]);
  });
}

}  // namespace vlmkit
