// weights_product (products.h): bf16, int8 and 4-bit weight rows streamed against a few activation rows.
#include "products.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>

#include "work_pool.h"

namespace vlmkit {
namespace {

constexpr int64_t kRowsPerBlock = 4;
constexpr int64_t kBlocksPerChunk = 16;

// Quantized weights multiply integers, so a weight needs no widening to fp32: the activations are rounded
// once per product (here, for both instruction sets' row kernels) and the kernels turn their integer sums to
// fp32 before they could overflow.
//
// int8 weights: each activation row rounded to int16 with one scale (15 bits against bf16's 8, no more
// error than the bf16 activations already carry).

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
  // Zen 4), the AVX2 ones all at once (they cut them into streams: in_streams, products_avx2.cpp).
  const auto product = [&](const PackedWeight& w, int64_t row, int64_t count, float* out) {
    switch (w.kind) {
      case PackedWeight::Kind::kBFloat16:
        if (avx512) {
          avx512_bf16_rows(bf16_x.data(), B, K, static_cast<const BFloat16*>(w.data), row, count, out, N);
        } else {
          avx2_bf16_rows(x, B, K, static_cast<const BFloat16*>(w.data), row, count, out, N);
        }
        break;
      case PackedWeight::Kind::kInt8:
        (avx512 ? avx512_int8_rows : avx2_int8_rows)(int8_x->values.data(), int8_x->scale.data(), B, w, row, count,
                                                     out, N);
        break;
      case PackedWeight::Kind::kInt4: {
        const GroupActivationsView view{int4_x->values.data(), int4_x->scale.data(), int4_x->group_sums.data()};
        (avx512 ? avx512_int4_rows : avx2_int4_rows)(view, int4_x->span, B, w, row, count, out, N);
        break;
      }
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
