// prefill_attention_bf16: attention of many query positions (a prompt's prefill, a vision tower) for CPUs
// with AVX-512 BF16, where torch's CPU flash attention runs at about a tenth of its bf16 GEMM's speed.
//
// The same arithmetic as a flash attention: scores q.k in fp32 from exact bf16 products (vdpbf16ps), an
// online softmax in fp32 over spans of 128 keys, the weights rounded to bf16 for the product with the
// values (fp32 sums), and the division by the weights' sum at the end. Keys and values are first packed in
// the pairs vdpbf16ps multiplies: for the scores, each key's (d, d + 1) pair side by side for 16 keys; for
// the values, each value's (j, j + 1) pair of keys side by side for 16 features. Blocks of keys past a
// causal diagonal are skipped. A query row with no key to attend to gets zeros, as torch's SDPA gives.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "exp_polynomial.h"
#include "ops.h"
#include "products.h"
#include "work_pool.h"

#if defined(VLMKIT_EMULATED_AVX512)  // after every other header: its macros stand for the AVX-512 intrinsics
#include "emulated_avx512.h"
#endif

namespace vlmkit {

#if VLMKIT_HAVE_AVX512
namespace {

constexpr int64_t kKeys = 16;  // keys per block: one vector of fp32 scores
constexpr int64_t kRows = 8;   // query rows that share each loaded key and value
constexpr int64_t kSpan = 8;   // blocks of keys per softmax step
// Packed keys and values up to this size stay allocated on the calling thread for the next call (every
// layer of a prefill packs the same amount): no allocation and no page faults per call.
constexpr int64_t kKeptScratchBytes = 64 << 20;

// keys [L, D] (row stride `stride`) -> [blocks][D / 2][16 keys] pairs; keys past L are zero
void pack_keys(const BFloat16* k, int64_t stride, int64_t L, int64_t D, uint32_t* out) {
  const int64_t blocks = (L + kKeys - 1) / kKeys, half = D / 2;
  for (int64_t block = 0; block < blocks; ++block) {
    uint32_t* lanes = out + block * half * kKeys;
    for (int64_t j = 0; j < kKeys; ++j) {
      const int64_t key = block * kKeys + j;
      if (key >= L) {
        for (int64_t d2 = 0; d2 < half; ++d2) lanes[d2 * kKeys + j] = 0;
        continue;
      }
      const BFloat16* row = k + key * stride;
      for (int64_t d2 = 0; d2 < half; ++d2) {
        uint32_t pair;  // (d, d + 1) side by side: the row's own bytes
        std::memcpy(&pair, row + 2 * d2, sizeof(pair));
        lanes[d2 * kKeys + j] = pair;
      }
    }
  }
}

// values [L, D] -> [blocks][8 key pairs][D] pairs; keys past L are zero
VLMKIT_AVX512 void pack_values(const BFloat16* v, int64_t stride, int64_t L, int64_t D, uint32_t* out) {
  const int64_t pairs = (L + kKeys - 1) / kKeys * (kKeys / 2);
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t first = 2 * pair;
    const BFloat16* low = first < L ? v + first * stride : nullptr;
    const BFloat16* high = first + 1 < L ? v + (first + 1) * stride : nullptr;
    uint32_t* features = out + pair * D;
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 lanes = D - d >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>(0xFF);
      const __m512i a = low ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, low + d)) : _mm512_setzero_si512();
      const __m512i b = high ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, high + d)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(features + d, lanes, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}

// e^x for x <= 0 (a score minus the row's largest), exp_polynomial.h's e^r * 2^n with 2^n by vscalefps;
// `floor` bounds x from below, where e^x is 0 in bf16 anyway.
VLMKIT_AVX512 inline __m512 exp16_nonpositive(__m512 x) {
  using namespace exp_polynomial;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), x);
  __m512 y = _mm512_set1_ps(kCoefficients[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kCoefficients[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

VLMKIT_AVX512 inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

struct Problem {
  const BFloat16* q;  // [B, H, Lq, D] at q_strides
  int64_t q_batch, q_head, q_row;
  const uint32_t *keys, *values;  // packed per (row, KV head)
  int64_t packed_size;  // uint32s per packed (row, KV head)
  const bool* mask;  // [B, Lq, Lk] or null
  bool causal;
  int64_t H, Hkv, Lq, Lk, D;
  float scale;
  BFloat16* out;  // [B, Lq, H, D]
};

// Which of the 16 keys from `start` a query row sees: those before `limit` (the causal diagonal or the
// last key), and of those, the ones its mask row allows.
VLMKIT_AVX512 inline __mmask16 visible_keys(int64_t start, int64_t limit, const bool* mask_row) {
  const int64_t count = std::clamp<int64_t>(limit - start, 0, kKeys);
  __mmask16 visible = static_cast<__mmask16>((1u << count) - 1);
  if (mask_row != nullptr && count > 0) {
    const __m128i bytes = _mm_maskz_loadu_epi8(visible, mask_row + start);
    visible &= _mm_cmpneq_epi8_mask(bytes, _mm_setzero_si128());
  }
  return visible;
}

// Query rows [r0, r0 + rows) of (row b, head h), over kSpan packed blocks of keys at a time: one max
// and one rescale per row for 128 keys; the weights' sums stay vectors until the end. Each inner loop
// keeps 16 independent sums in flight (8 rows times 2 key blocks, or times 2 feature vectors), enough
// to hide vdpbf16ps's latency on both of a core's vector pipes.
VLMKIT_AVX512 void attend_rows(const Problem& p, int64_t b, int64_t h, int64_t r0, int64_t rows) {
  const int64_t D = p.D, half = D / 2, kv = h / (p.H / p.Hkv), offset = p.Lk - p.Lq, chunks = (D + 15) / 16;
  alignas(64) uint32_t q_pairs[kRows][128];
  alignas(64) float acc[kRows][256 + 16];  // the last 16 lanes may run past D (D % 16 == 8)
  alignas(64) uint32_t weights[kRows][kSpan * kKeys / 2];
  float top[kRows];  // the largest scaled score each row has seen
  int64_t limit[kRows];  // each row sees keys before this one (and of those, what its mask allows)
  const bool* mask_rows[kRows];
  __m512 total[kRows];
  for (int64_t r = 0; r < kRows; ++r) {  // rows past `rows` (the last block) have zero queries and weights
    const BFloat16* row = p.q + b * p.q_batch + h * p.q_head + (r0 + r) * p.q_row;
    if (r < rows) {
      std::memcpy(q_pairs[r], row, D * sizeof(BFloat16));  // (d, d + 1) side by side: the row's own bytes
    } else {
      std::fill_n(q_pairs[r], half, 0u);
      std::fill_n(weights[r], kSpan * kKeys / 2, 0u);
    }
    std::fill_n(acc[r], chunks * 16, 0.f);
    top[r] = -std::numeric_limits<float>::infinity();
    limit[r] = p.causal ? std::min(p.Lk, r0 + r + offset + 1) : p.Lk;
    mask_rows[r] = p.mask == nullptr ? nullptr : p.mask + (b * p.Lq + r0 + r) * p.Lk;
    total[r] = _mm512_setzero_ps();
  }
  const uint32_t* keys = p.keys + (b * p.Hkv + kv) * p.packed_size;
  const uint32_t* values = p.values + (b * p.Hkv + kv) * p.packed_size;
  const int64_t last_key = p.causal ? std::min(p.Lk, r0 + rows + offset) : p.Lk;  // keys any row may see
  const int64_t blocks = (last_key + kKeys - 1) / kKeys;
  const __m512 scale = _mm512_set1_ps(p.scale), minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 lowest = _mm512_set1_ps(-87.3f);  // e^x of anything below is 0 in bf16
  for (int64_t first = 0; first < blocks; first += kSpan) {
    const int64_t span = std::min(kSpan, blocks - first);
    __m512 scores[kRows][kSpan];
    for (int64_t s = 0; s < span; s += 2) {  // two blocks of keys at a time (one for an odd last block)
      const uint32_t* key_pairs = keys + (first + s) * half * kKeys;
      __m512 a[kRows], c[kRows];
      for (int64_t r = 0; r < kRows; ++r) a[r] = c[r] = _mm512_setzero_ps();
      if (s + 1 < span) {
        for (int64_t d2 = 0; d2 < half; ++d2) {
          const __m512bh k0 = as_bh(_mm512_loadu_si512(key_pairs + d2 * kKeys));
          const __m512bh k1 = as_bh(_mm512_loadu_si512(key_pairs + (half + d2) * kKeys));
          for (int64_t r = 0; r < kRows; ++r) {
            const __m512bh q = as_bh(_mm512_set1_epi32(static_cast<int>(q_pairs[r][d2])));
            a[r] = _mm512_dpbf16_ps(a[r], q, k0);
            c[r] = _mm512_dpbf16_ps(c[r], q, k1);
          }
        }
      } else {
        for (int64_t d2 = 0; d2 < half; ++d2) {
          const __m512bh k0 = as_bh(_mm512_loadu_si512(key_pairs + d2 * kKeys));
          for (int64_t r = 0; r < kRows; ++r) {
            a[r] = _mm512_dpbf16_ps(a[r], as_bh(_mm512_set1_epi32(static_cast<int>(q_pairs[r][d2]))), k0);
          }
        }
      }
      for (int64_t r = 0; r < kRows; ++r) {
        scores[r][s] = a[r];
        if (s + 1 < span) scores[r][s + 1] = c[r];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      __mmask16 visible[kSpan];
      __mmask16 any = 0;
      __m512 best = minus_infinity;
      for (int64_t s = 0; s < span; ++s) {
        visible[s] = visible_keys((first + s) * kKeys, limit[r], mask_rows[r]);
        best = _mm512_mask_max_ps(best, visible[s], best, scores[r][s]);
        any |= visible[s];
      }
      if (any == 0) {
        std::fill_n(weights[r], kSpan * kKeys / 2, 0u);
        continue;
      }
      // the largest scaled score is the largest score scaled (scale > 0, rounding keeps the order)
      const float new_top = std::max(top[r], _mm512_reduce_max_ps(best) * p.scale);
      const __m512 shift = _mm512_set1_ps(new_top);
      __m512 sum = total[r];
      if (new_top != top[r]) {
        const float shrink = std::exp(top[r] - new_top);  // 0 while nothing was seen before
        sum = _mm512_mul_ps(sum, _mm512_set1_ps(shrink));
        for (int64_t d = 0; d < chunks * 16; d += 16) {
          _mm512_store_ps(acc[r] + d, _mm512_mul_ps(_mm512_load_ps(acc[r] + d), _mm512_set1_ps(shrink)));
        }
      }
      for (int64_t s = 0; s < span; ++s) {
        const __m512 x = _mm512_mask_max_ps(lowest, visible[s], _mm512_fmsub_ps(scores[r][s], scale, shift), lowest);
        const __m512 e = _mm512_maskz_mov_ps(visible[s], exp16_nonpositive(x));
        sum = _mm512_add_ps(sum, e);
        const __m256bh rounded = _mm512_cvtneps_pbh(e);  // the weights in bf16, pairs of keys side by side
        std::memcpy(weights[r] + s * kKeys / 2, &rounded, sizeof(rounded));
      }
      total[r] = sum;
      top[r] = new_top;
    }
    // each loaded pair of values serves every row (rows past `rows` have zero weights and are not written
    // out); consecutive blocks' pairs lie one after another, so the span's pairs are one run
    const uint32_t* value_pairs = values + first * (kKeys / 2) * D;
    const int64_t pairs = span * (kKeys / 2);
    int64_t chunk = 0;
    for (; chunk + 2 <= chunks; chunk += 2) {  // two vectors of features at a time; only the last may be partial
      const int64_t d = chunk * 16;
      const __mmask16 second = D - d - 16 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>(0xFF);
      __m512 a[kRows], c[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        a[r] = _mm512_load_ps(acc[r] + d);
        c[r] = _mm512_load_ps(acc[r] + d + 16);
      }
      for (int64_t pair = 0; pair < pairs; ++pair) {
        const __m512bh v0 = as_bh(_mm512_loadu_si512(value_pairs + pair * D + d));
        const __m512bh v1 = as_bh(_mm512_maskz_loadu_epi32(second, value_pairs + pair * D + d + 16));
        for (int64_t r = 0; r < kRows; ++r) {
          const __m512bh w = as_bh(_mm512_set1_epi32(static_cast<int>(weights[r][pair])));
          a[r] = _mm512_dpbf16_ps(a[r], w, v0);
          c[r] = _mm512_dpbf16_ps(c[r], w, v1);
        }
      }
      for (int64_t r = 0; r < kRows; ++r) {
        _mm512_store_ps(acc[r] + d, a[r]);
        _mm512_store_ps(acc[r] + d + 16, c[r]);
      }
    }
    if (chunk < chunks) {  // an odd last vector of features
      const int64_t d = chunk * 16;
      const __mmask16 features = D - d >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>(0xFF);
      __m512 a[kRows];
      for (int64_t r = 0; r < kRows; ++r) a[r] = _mm512_load_ps(acc[r] + d);
      for (int64_t pair = 0; pair < pairs; ++pair) {
        const __m512bh v = as_bh(_mm512_maskz_loadu_epi32(features, value_pairs + pair * D + d));
        for (int64_t r = 0; r < kRows; ++r) {
          a[r] = _mm512_dpbf16_ps(a[r], as_bh(_mm512_set1_epi32(static_cast<int>(weights[r][pair]))), v);
        }
      }
      for (int64_t r = 0; r < kRows; ++r) _mm512_store_ps(acc[r] + d, a[r]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float sum = _mm512_reduce_add_ps(total[r]);
    const __m512 norm = _mm512_set1_ps(sum > 0.f ? 1.f / sum : 0.f);
    BFloat16* out = p.out + ((b * p.Lq + r0 + r) * p.H + h) * D;
    for (int64_t d = 0; d < D; d += 16) {
      const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(acc[r] + d), norm));
      const __mmask16 features = D - d >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>(0xFF);
      _mm256_mask_storeu_epi16(out + d, features, reinterpret_cast<const __m256i&>(rounded));
    }
  }
}

// The packed keys and values of one call: kept on this thread for the next call up to kKeptScratchBytes.
uint32_t* packing_scratch(int64_t count, std::unique_ptr<uint32_t[]>& too_large_to_keep) {
  thread_local std::unique_ptr<uint32_t[]> kept;
  thread_local int64_t kept_count = 0;
  if (count * static_cast<int64_t>(sizeof(uint32_t)) > kKeptScratchBytes) {
    too_large_to_keep.reset(new uint32_t[count]);
    return too_large_to_keep.get();
  }
  if (count > kept_count) {
    kept.reset(new uint32_t[count]);
    kept_count = count;
  }
  return kept.get();
}

}  // namespace
#endif

// q [B, H, Lq, D], keys and values [B, Hkv, Lk, D] (last dimension contiguous), mask: optional bool
// [B, 1, Lq, Lk] of the keys each query may attend to; causal: query i sees keys up to i + Lk - Lq.
// Returns [B, H, Lq, D] (memory laid out [B, Lq, H, D]).
at::Tensor prefill_attention_bf16(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                  const std::optional<at::Tensor>& mask, bool causal, double scale) {
  constexpr const char* op = "vlmkit::prefill_attention_bf16";
  TORCH_CHECK(VLMKIT_HAVE_AVX512 && kernel_isa() == "avx512", op, " needs the AVX-512 kernels (set_kernel_isa)");
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes(), op, ": q [B, H, Lq, D], keys and values [B, Hkv, Lk, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16,
              op, " takes bf16 tensors");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = keys.size(1), Lk = keys.size(2);
  TORCH_CHECK(keys.size(0) == B && keys.size(3) == D && H % Hkv == 0 && D % 8 == 0 && D <= 256 && Lq <= Lk, op,
              ": mismatched shapes (or a head size that is not a multiple of 8 up to 256)");
  TORCH_CHECK(q.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1, op, ": rows must be contiguous");
  at::Tensor allowed;
  if (mask.has_value() && mask->defined()) {
    allowed = mask->to(at::kBool).expand({B, 1, Lq, Lk}).contiguous();
  }
  at::Tensor out = at::empty({B, Lq, H, D}, q.options());
#if VLMKIT_HAVE_AVX512
  const int64_t blocks = (Lk + kKeys - 1) / kKeys, packed_size = blocks * kKeys * (D / 2);
  std::unique_ptr<uint32_t[]> too_large_to_keep;
  uint32_t* packed_keys = packing_scratch(2 * B * Hkv * packed_size, too_large_to_keep);
  uint32_t* packed_values = packed_keys + B * Hkv * packed_size;
  const BFloat16* kp = keys.const_data_ptr<BFloat16>();
  const BFloat16* vp = values.const_data_ptr<BFloat16>();
  parallel_chunks_on_torch_threads(B * Hkv, [&](int64_t task) {
    const int64_t b = task / Hkv, kv = task % Hkv;
    pack_keys(kp + b * keys.stride(0) + kv * keys.stride(1), keys.stride(2), Lk, D, packed_keys + task * packed_size);
    pack_values(vp + b * values.stride(0) + kv * values.stride(1), values.stride(2), Lk, D, packed_values + task * packed_size);
  });
  const Problem problem{q.const_data_ptr<BFloat16>(), q.stride(0), q.stride(1), q.stride(2), packed_keys,
                        packed_values, packed_size, allowed.defined() ? allowed.const_data_ptr<bool>() : nullptr,
                        causal, H, Hkv, Lq, Lk, D, static_cast<float>(scale), out.data_ptr<BFloat16>()};
  const int64_t row_blocks = (Lq + kRows - 1) / kRows;
  // the last query blocks of a causal attention see the most keys: hand them out first
  parallel_chunks_on_torch_threads(B * H * row_blocks, [&](int64_t task) {
    const int64_t row_block = row_blocks - 1 - task % row_blocks, head = task / row_blocks;
    const int64_t r0 = row_block * kRows;
    attend_rows(problem, head / H, head % H, r0, std::min(kRows, Lq - r0));
  });
#endif
  return out.transpose(1, 2);
}

}  // namespace vlmkit
