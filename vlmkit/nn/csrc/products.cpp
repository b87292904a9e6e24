// weights_product (products.h): bf16, int8 and 4-bit weight rows streamed against a few activation rows.
#include "products.h"

#include <algorithm>
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

// 4-bit rows. Per group the sum is s * sum(q x) + (z - 8 s) * sum(x): the inner loop multiplies the
// bare values 0..15, and the sums of x per group are taken once per product. Unpacking takes two
// instructions per 8 weights: 16 bytes widen to eight 32-bit lanes of four nibbles, and the i-th vector
// keeps nibble i of each lane where it is (a mask) and converts it: q * 16^i, exact in fp32. Lane j of
// the i-th vector is input 4 j + (1, 0, 3, 2)[i] of the 32; the activations are put in that order, and
// scaled by 16^-i (exact too), once per product (Int4Activations).
inline __m256 nibble_times_power(__m256i lanes, int i) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32(15 << (4 * i))));
}

struct Int4Activations {
  Int4Activations(const float* x, int64_t B, int64_t K, int64_t G) : ordered(B * K), sums(B * (K / G), 0.f) {
    constexpr int kNibble[4] = {1, 0, 3, 2};
    constexpr float kPower[4] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096};
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < K; ++k) sums[b * (K / G) + k / G] += x[b * K + k];
      for (int64_t block = b * K; block < (b + 1) * K; block += 32) {
        for (int i = 0; i < 4; ++i) {
          for (int j = 0; j < 8; ++j) ordered[block + 8 * i + j] = x[block + 4 * j + kNibble[i]] * kPower[i];
        }
      }
    }
  }
  std::vector<float> ordered, sums;  // [B, K] in nibble order, [B, K / G]
};

template <int ROWS_X>
void int4_rows(const float* x, const float* xsum, const PackedWeight& weight, int64_t row, int64_t rows, float* y,
               int64_t N) {
  constexpr int U = ROWS_X == 1 ? 4 : (ROWS_X == 2 ? 2 : 1);
  const int64_t K = weight.K, G = weight.G, groups = K / G;
  const uint8_t* w = static_cast<const uint8_t*>(weight.data);
  for (int64_t r = row; r < row + rows; ++r) {
    const uint8_t* wr = w + r * (K / 2);
    __m256 total[ROWS_X];
    float offset[ROWS_X];
    for (int b = 0; b < ROWS_X; ++b) {
      total[b] = _mm256_setzero_ps();
      offset[b] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m256 acc[U][ROWS_X];
      for (int u = 0; u < U; ++u) {
        for (int b = 0; b < ROWS_X; ++b) acc[u][b] = _mm256_setzero_ps();
      }
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + k / 2 + 2048), _MM_HINT_T0);  // 2 KiB ahead: a little better than 512 B here
        const __m256i lanes = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k / 2)));
        const __m256 wv[4] = {nibble_times_power(lanes, 0), nibble_times_power(lanes, 1), nibble_times_power(lanes, 2),
                              nibble_times_power(lanes, 3)};
        for (int u = 0; u < 4; ++u) {
          for (int b = 0; b < ROWS_X; ++b) {
            acc[u % U][b] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + b * K + k + 8 * u), acc[u % U][b]);
          }
        }
      }
      const float s = weight.scale_at(r * groups + g), z = weight.zero_at(r * groups + g);
      for (int b = 0; b < ROWS_X; ++b) {
        __m256 sum = acc[0][b];
        for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][b]);
        total[b] = _mm256_fmadd_ps(_mm256_set1_ps(s), sum, total[b]);
        offset[b] += (z - 8.f * s) * xsum[b * groups + g];
      }
    }
    for (int b = 0; b < ROWS_X; ++b) y[b * N + r] = horizontal_sum(total[b]) + offset[b];
  }
}

void int4_product(const Int4Activations& x, int64_t B, const PackedWeight& weight, int64_t row, int64_t rows,
                  float* y, int64_t N) {
  const int64_t K = weight.K, groups = K / weight.G;
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const float *xb = x.ordered.data() + b0 * K, *sb = x.sums.data() + b0 * groups;
    float* yb = y + b0 * N;
    switch (std::min<int64_t>(4, B - b0)) {
      case 1: int4_rows<1>(xb, sb, weight, row, rows, yb, N); break;
      case 2: int4_rows<2>(xb, sb, weight, row, rows, yb, N); break;
      case 3: int4_rows<3>(xb, sb, weight, row, rows, yb, N); break;
      default: int4_rows<4>(xb, sb, weight, row, rows, yb, N); break;
    }
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
  std::optional<Int4Activations> int4_x;
  if (G > 0) int4_x.emplace(x, B, K, G);
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
          rows_product(x, B, K, static_cast<const int8_t*>(w.data), row, count, out, N);
          for (int64_t b = 0; b < B; ++b) {
            for (int64_t r = row; r < row + count; ++r) out[b * N + r] *= w.scale_at(r);
          }
          break;
        case PackedWeight::Kind::kInt4:
          int4_product(*int4_x, B, w, row, count, out, N);
          break;
      }
    }
  });
}

}  // namespace vlmkit
