// weights_product (products.h): bf16, int8 and 4-bit weight rows streamed against a few activation rows.
#include "products.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>

#include "work_pool.h"

namespace vlmkit {
namespace {

constexpr int64_t kRowsPerBlock = 4;
constexpr int64_t kBlocksPerChunk = 16;

// Rows [row, row + rows) of W against ROWS_X activation rows; writes fp32 sums to y. Each weight row is
// read front to back (one sequential stream, prefetched 1 KiB ahead) with several accumulators per
// activation row to hide FMA latency.
template <int ROWS_X, typename W>
void block_product(const float* x, int64_t K, const W* w, int64_t row, int64_t rows, float* y, int64_t N) {
  constexpr int U = ROWS_X == 1 ? 4 : (ROWS_X == 2 ? 3 : 2);
  for (int64_t r = 0; r < rows; ++r) {
    const W* wr = w + (row + r) * K;
    __m256 acc[U][ROWS_X];
    for (int u = 0; u < U; ++u) {
      for (int b = 0; b < ROWS_X; ++b) acc[u][b] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + k + 512), _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const __m256 wv = load_bf16x8(wr + k + 8 * u);
        for (int b = 0; b < ROWS_X; ++b) {
          acc[u][b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * K + k + 8 * u), acc[u][b]);
        }
      }
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = load_bf16x8(wr + k);
      for (int b = 0; b < ROWS_X; ++b) acc[0][b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * K + k), acc[0][b]);
    }
    for (int b = 0; b < ROWS_X; ++b) {
      __m256 total = acc[0][b];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[u][b]);
      float sum = horizontal_sum(total);
      for (int64_t kk = k; kk < K; ++kk) sum += static_cast<float>(wr[kk]) * x[b * K + kk];
      y[b * N + row + r] = sum;
    }
  }
}

template <typename W>
void rows_product(const float* x, int64_t B, int64_t K, const W* w, int64_t row, int64_t rows, float* y,
                  int64_t N) {
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const float* xb = x + b0 * K;
    float* yb = y + b0 * N;
    switch (std::min<int64_t>(4, B - b0)) {
      case 1: block_product<1>(xb, K, w, row, rows, yb, N); break;
      case 2: block_product<2>(xb, K, w, row, rows, yb, N); break;
      case 3: block_product<3>(xb, K, w, row, rows, yb, N); break;
      default: block_product<4>(xb, K, w, row, rows, yb, N); break;
    }
  }
}

// Quantized weights multiply integers: the activation rows are rounded once per product to int16 (a scale
// per row: 15 bits against bf16's 8, so no more error than the bf16 activations already carry) and
// vpmaddwd multiplies 16 weight/activation pairs and adds neighbours in one instruction, twice the
// weights per instruction of widening to fp32. int32 sums are turned to fp32 before they could overflow
// (int8: every kIntBlock inputs; 4-bit: every group).
constexpr int64_t kIntBlock = 2048;  // 128 steps of at most 2 * 127 * 32767 per int32 lane

struct Int16Activations {
  // nibble_order: each 32 inputs stored as the 16 even ones, then the 16 odd ones (the high and low
  // nibbles of 16 bytes); G: inputs per 4-bit group, for the per-group sums (0: none).
  Int16Activations(const float* x, int64_t B, int64_t K, bool nibble_order, int64_t G)
      : values(B * K), scale(B), group_sums(G > 0 ? B * (K / G) : 0, 0.f) {
    for (int64_t b = 0; b < B; ++b) {
      const float* row = x + b * K;
      float top = 0.f;
      bool finite = true;
      for (int64_t k = 0; k < K; ++k) {
        top = std::max(top, std::fabs(row[k]));
        finite = finite && std::isfinite(row[k]);
      }
      // a row with inf or NaN gives NaN, as a float product would, not a silently rounded one
      scale[b] = !finite ? std::numeric_limits<float>::quiet_NaN() : top > 0.f ? top / 32767.f : 1.f;
      const float inverse = 1.f / scale[b];
      int16_t* out = values.data() + b * K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t at = nibble_order ? k - k % 32 + (k % 2) * 16 + (k % 32) / 2 : k;
        out[at] = finite ? static_cast<int16_t>(std::lrint(row[k] * inverse)) : 0;
        if (G > 0) group_sums[b * (K / G) + k / G] += static_cast<float>(out[at]) * scale[b];
      }
    }
  }
  std::vector<int16_t> values;  // [B, K]
  std::vector<float> scale;  // [B]: x ~ values * scale
  std::vector<float> group_sums;  // [B, K / G]: the sums of the rounded x per group
};

inline __m256i load_int16x16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

template <int ROWS_X>
void int8_rows(const Int16Activations& x, const int16_t* xv, int64_t b0, const PackedWeight& weight, int64_t row,
               int64_t rows, float* y, int64_t N) {
  const int64_t K = weight.K, vector_end = K - K % 16;
  for (int64_t r = row; r < row + rows; ++r) {
    const int8_t* wr = static_cast<const int8_t*>(weight.data) + r * K;
    __m256 total[ROWS_X];
    for (int b = 0; b < ROWS_X; ++b) total[b] = _mm256_setzero_ps();
    int64_t k = 0;
    while (k < vector_end) {
      const int64_t end = std::min(vector_end, k + kIntBlock);
      __m256i acc[ROWS_X];
      for (int b = 0; b < ROWS_X; ++b) acc[b] = _mm256_setzero_si256();
      for (; k < end; k += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + k + 1024), _MM_HINT_T0);
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k)));
        for (int b = 0; b < ROWS_X; ++b) {
          acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(wv, load_int16x16(xv + b * K + k)));
        }
      }
      for (int b = 0; b < ROWS_X; ++b) total[b] = _mm256_add_ps(total[b], _mm256_cvtepi32_ps(acc[b]));
    }
    for (int b = 0; b < ROWS_X; ++b) {
      float sum = horizontal_sum(total[b]);
      for (int64_t kk = vector_end; kk < K; ++kk) sum += static_cast<float>(wr[kk]) * xv[b * K + kk];
      y[b * N + r] = sum * x.scale[b0 + b] * weight.scale_at(r);
    }
  }
}

// 4-bit rows: per group the sum is s * sum(q x) + (z - 8 s) * sum(x), so the inner loop multiplies the
// bare values 0..15. 16 bytes widen to 16 int16 lanes; the high nibbles (shifted down) are the even
// inputs, the low ones (masked) the odd inputs, which is how Int16Activations orders them.
template <int ROWS_X>
void int4_rows(const Int16Activations& x, const int16_t* xv, int64_t b0, const PackedWeight& weight, int64_t row,
               int64_t rows, float* y, int64_t N) {
  const int64_t K = weight.K, G = weight.G, groups = K / G;
  const __m256i low_nibble = _mm256_set1_epi16(15);
  for (int64_t r = row; r < row + rows; ++r) {
    const uint8_t* wr = static_cast<const uint8_t*>(weight.data) + r * (K / 2);
    __m256 total[ROWS_X];
    float offset[ROWS_X];
    for (int b = 0; b < ROWS_X; ++b) {
      total[b] = _mm256_setzero_ps();
      offset[b] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m256i acc[ROWS_X];
      for (int b = 0; b < ROWS_X; ++b) acc[b] = _mm256_setzero_si256();
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + k / 2 + 1024), _MM_HINT_T0);
        const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k / 2)));
        const __m256i even = _mm256_srli_epi16(bytes, 4), odd = _mm256_and_si256(bytes, low_nibble);
        for (int b = 0; b < ROWS_X; ++b) {
          const int16_t* xk = xv + b * K + k;
          acc[b] = _mm256_add_epi32(acc[b], _mm256_add_epi32(_mm256_madd_epi16(even, load_int16x16(xk)),
                                                             _mm256_madd_epi16(odd, load_int16x16(xk + 16))));
        }
      }
      const float s = weight.scale_at(r * groups + g), z = weight.zero_at(r * groups + g);
      for (int b = 0; b < ROWS_X; ++b) {
        total[b] = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(acc[b]), total[b]);
        offset[b] += (z - 8.f * s) * x.group_sums[(b0 + b) * groups + g];
      }
    }
    for (int b = 0; b < ROWS_X; ++b) y[b * N + r] = horizontal_sum(total[b]) * x.scale[b0 + b] + offset[b];
  }
}

// Every activation row against rows [row, row + rows) of an int8 (or, NIBBLES, 4-bit) weight, four at a time.
template <bool NIBBLES>
void integer_product(const Int16Activations& x, int64_t B, const PackedWeight& weight, int64_t row, int64_t rows,
                     float* y, int64_t N) {
  constexpr auto kRows = NIBBLES ? std::array{&int4_rows<1>, &int4_rows<2>, &int4_rows<3>, &int4_rows<4>}
                                 : std::array{&int8_rows<1>, &int8_rows<2>, &int8_rows<3>, &int8_rows<4>};
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    kRows[std::min<int64_t>(4, B - b0) - 1](x, x.values.data() + b0 * weight.K, b0, weight, row, rows, y + b0 * N, N);
  }
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

void weights_product(const float* x, int64_t B, int64_t K, const std::vector<PackedWeight>& weights, float* y) {
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
  std::optional<Int16Activations> int8_x, int4_x;  // rounded once per product, for the kinds present
  for (const PackedWeight& w : weights) {
    if (w.kind == PackedWeight::Kind::kInt8 && !int8_x) int8_x.emplace(x, B, K, false, 0);
  }
  if (G > 0) int4_x.emplace(x, B, K, true, G);
  const int64_t N = first_column.back(), blocks = first_block.back();
  parallel_chunks((blocks + kBlocksPerChunk - 1) / kBlocksPerChunk, [&](int64_t chunk) {
    size_t which = 0;
    const int64_t end = std::min(blocks, (chunk + 1) * kBlocksPerChunk);
    for (int64_t block = chunk * kBlocksPerChunk; block < end; ++block) {
      while (block >= first_block[which + 1]) ++which;
      const PackedWeight& w = weights[which];
      const int64_t row = (block - first_block[which]) * kRowsPerBlock, count = std::min(kRowsPerBlock, w.N - row);
      float* out = y + first_column[which];  // this weight's outputs start at its first column
      switch (w.kind) {
        case PackedWeight::Kind::kBFloat16:
          rows_product(x, B, K, static_cast<const BFloat16*>(w.data), row, count, out, N);
          break;
        case PackedWeight::Kind::kInt8:
          integer_product<false>(*int8_x, B, w, row, count, out, N);
          break;
        case PackedWeight::Kind::kInt4:
          integer_product<true>(*int4_x, B, w, row, count, out, N);
          break;
      }
    }
  });
}

}  // namespace vlmkit
