// decode_attention_bf16 and decoder_layer_step_bf16: the attention and whole-layer parts of a decode step.
// decoder_layer_step_bf16 is the twin of the Python DecoderLayer (vlmkit/nn/decoder.py), called through
// cpu_kernels.decoder_layer_step; tests/test_cpu_kernels.py (test_one_call_decode_layer_step_computes_what_
// the_modules_compute) keeps them equal: a change to one is a change to the other.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include <cmath>
#include <limits>

#include "exp_polynomial.h"
#include "ops.h"
#include "products.h"
#include "rms_norm.h"
#include "rotary.h"
#include "work_pool.h"

namespace vlmkit {
namespace {

// e^x for 8 floats (exp_polynomial.h; below about -87.3 it gives a value under 1e-38 where std::exp gives 0
// or a denormal). A scalar std::exp per attention weight cost more than the attention's arithmetic.
inline __m256 exp8(__m256 x) {
  using namespace exp_polynomial;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), x);
  __m256 y = _mm256_set1_ps(kCoefficients[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kCoefficients[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

// In place: each score s of a head becomes its softmax weight e^(s - top) (0 for a masked key, -inf);
// returns their sum.
inline float softmax_weights(float* scores, int64_t L, float top) {
  const __m256 shift = _mm256_set1_ps(top), masked = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) {
    const __m256 s = _mm256_loadu_ps(scores + j);
    const __m256 p = _mm256_andnot_ps(_mm256_cmp_ps(s, masked, _CMP_EQ_OQ), exp8(_mm256_sub_ps(s, shift)));
    _mm256_storeu_ps(scores + j, p);
    sum = _mm256_add_ps(sum, p);
  }
  float total = horizontal_sum(sum);
  for (; j < L; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  return total;
}

// One batch row and `heads` query heads that share one KV head (grouped-query attention: Qwen2 has 7 per
// KV head): for each head, softmax over the valid keys of scale * q.k, then the weighted sum of values.
// Each key and value is read once for all the heads, not once per head. q and out: [heads, D]
// contiguous. Per head the sums run in the same order as for a head alone.
void attend_heads(const BFloat16* q, int64_t heads, const BFloat16* k, const BFloat16* v, int64_t key_stride,
                  int64_t L, int64_t D, float scale, const bool* valid, BFloat16* out) {
  constexpr int64_t kMaxHeads = 8;  // query vectors kept in registers' reach per pass over the keys
  thread_local std::vector<float> qf, scores, acc;
  qf.resize(heads * D);
  scores.resize(heads * L);
  acc.assign(heads * D, 0.f);
  for (int64_t i = 0; i < heads * D; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  std::vector<float> top(heads, -std::numeric_limits<float>::infinity()), total(heads, 0.f);
  for (int64_t h0 = 0; h0 < heads; h0 += kMaxHeads) {
    const int64_t count = std::min(kMaxHeads, heads - h0);
    int64_t j = 0;
    if (count <= 2) {
      // One or two heads per KV head (no grouped queries: LLaMA, Janus): four keys at a time, or each
      // dot product would wait on its one chain of dependent multiply-adds (latency-bound, not memory).
      for (; j + 4 <= L; j += 4) {
        __m256 dot[4][2];
        for (int t = 0; t < 4; ++t) dot[t][0] = dot[t][1] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          for (int t = 0; t < 4; ++t) {
            const __m256 kv = load_bf16x8(k + (j + t) * key_stride + d);
            for (int64_t h = 0; h < count; ++h) dot[t][h] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(&qf[(h0 + h) * D + d]), dot[t][h]);
          }
        }
        for (int t = 0; t < 4; ++t) {
          const bool masked = valid != nullptr && !valid[j + t];
          for (int64_t h = 0; h < count; ++h) {
            const float score = masked ? -std::numeric_limits<float>::infinity() : horizontal_sum(dot[t][h]);
            scores[(h0 + h) * L + j + t] = score;
            top[h0 + h] = std::max(top[h0 + h], score);
          }
        }
      }
    }
    for (; j < L; ++j) {
      if (valid != nullptr && !valid[j]) {
        for (int64_t h = h0; h < h0 + count; ++h) scores[h * L + j] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const BFloat16* key = k + j * key_stride;
      __m256 dot[kMaxHeads];
      for (int64_t h = 0; h < count; ++h) dot[h] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 kv = load_bf16x8(key + d);
        for (int64_t h = 0; h < count; ++h) dot[h] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(&qf[(h0 + h) * D + d]), dot[h]);
      }
      for (int64_t h = 0; h < count; ++h) {
        const float score = horizontal_sum(dot[h]);
        scores[(h0 + h) * L + j] = score;
        top[h0 + h] = std::max(top[h0 + h], score);
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {  // the weights, in place of the scores
    if (top[h] > -std::numeric_limits<float>::infinity()) {
      total[h] = softmax_weights(&scores[h * L], L, top[h]);
    } else {
      std::fill_n(&scores[h * L], L, 0.f);
    }
  }
  for (int64_t j = 0; j < L; ++j) {
    const BFloat16* value = v + j * key_stride;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 vv = load_bf16x8(value + d);
      for (int64_t h = 0; h < heads; ++h) {
        const float p = scores[h * L + j];
        if (p == 0.f) continue;
        float* a = &acc[h * D + d];
        _mm256_storeu_ps(a, _mm256_fmadd_ps(vv, _mm256_set1_ps(p), _mm256_loadu_ps(a)));
      }
    }
  }
  // a row with no valid key (a pad position) gets zeros, as torch's SDPA gives
  for (int64_t h = 0; h < heads; ++h) {
    const float norm = total[h] > 0.f ? 1.f / total[h] : 0.f;
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<BFloat16>(acc[h * D + d] * norm);
  }
}

// Attention of one position for B rows and H query heads over Hkv KV heads, one task per (row, KV head)
// and its query heads; the heads are split further only where that leaves threads idle.
template <typename Attend>
void attend_all(int64_t B, int64_t H, int64_t Hkv, const Attend& attend) {
  const int64_t group = H / Hkv, threads = at::get_num_threads();
  const int64_t splits = B * Hkv >= threads ? 1 : std::min(group, (threads + B * Hkv - 1) / (B * Hkv));
  const int64_t per_task = (group + splits - 1) / splits, tasks_per_kv = (group + per_task - 1) / per_task;
  parallel_chunks(B * Hkv * tasks_per_kv, [&](int64_t task) {
    const int64_t b = task / (Hkv * tasks_per_kv), kv = task / tasks_per_kv % Hkv, part = task % tasks_per_kv;
    const int64_t first = kv * group + part * per_task;
    attend(b, kv, first, std::min(per_task, (kv + 1) * group - first));
  });
}

// Every intermediate of the layer step is rounded to bf16 where torch's bf16 ops round it (after each norm,
// projection, rotary product and sum, activation, product and residual sum), so it computes what the
// Python layer computes, up to the order of sums (bf16_round: products.h).
//
// v[i] = bf16_round(v[i]) for n values, 8 at a time (round_to_bf16x8 rounds as c10::BFloat16 does).
inline void round_in_place(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, widen_bf16x8(round_to_bf16x8(_mm256_loadu_ps(v + i))));
  for (; i < n; ++i) v[i] = bf16_round(v[i]);
}

// x[i] = bf16_round(x[i] + add[i]): a residual sum as torch's bf16 add rounds it.
inline void add_rounded(float* x, const float* add, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 sum = _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(add + i));
    _mm256_storeu_ps(x + i, widen_bf16x8(round_to_bf16x8(sum)));
  }
  for (; i < n; ++i) x[i] = bf16_round(x[i] + add[i]);
}

constexpr const char* kLayerStep = "vlmkit::decoder_layer_step_bf16";

// x [B, K] times each weight (a list of its parts), side by side in y [B, sum N], rounded to bf16 as the
// modules round: bf16 weights once, after the bias; quantized ones after the product and again after
// the bias (their modules add it to the bf16 product).
struct Projection {
  Projection(const float* x, int64_t B, int64_t K, const std::vector<at::TensorList>& weights,
             at::TensorList biases) {
    TORCH_CHECK(biases.empty() || biases.size() == weights.size(), kLayerStep, ": one bias per weight, or none");
    const PackedWeights packed(weights, K, kLayerStep);
    N = packed.N;
    for (const PackedWeight& w : packed.list) rows.push_back(w.N);
    y.resize(B * N);
    weights_product(x, B, K, packed.list, y.data());
    int64_t column = 0;
    for (size_t i = 0; i < packed.list.size(); ++i) {
      at::Tensor bias = biases.empty() ? at::Tensor() : biases[i].to(at::kFloat).contiguous();
      for (int64_t b = 0; b < B; ++b) {
        float* out = y.data() + b * N + column;
        if (packed.list[i].quantized() && bias.defined()) round_in_place(out, rows[i]);
        if (bias.defined()) {
          add_rounded(out, bias.const_data_ptr<float>(), rows[i]);
        } else {
          round_in_place(out, rows[i]);
        }
      }
      column += rows[i];
    }
  }
  std::vector<float> y;
  std::vector<int64_t> rows;
  int64_t N = 0;
};

}  // namespace

// q [B, H, 1, D], keys/values [B, Hkv, L, D] (strided views of the cache, last dim contiguous),
// valid: optional bool [B, L] of keys to attend to. Returns [B, H, 1, D] (memory laid out [B, 1, H, D]).
at::Tensor decode_attention_bf16(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                 const std::optional<at::Tensor>& valid, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "vlmkit::decode_attention_bf16: q [B, H, 1, D], keys and values [B, Hkv, L, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
                  values.scalar_type() == at::kBFloat16,
              "vlmkit::decode_attention_bf16 takes bf16 tensors");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = keys.size(1), L = keys.size(2);
  TORCH_CHECK(keys.size(0) == B && keys.size(3) == D && H % Hkv == 0 && D % 8 == 0,
              "vlmkit::decode_attention_bf16: mismatched shapes");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1 && keys.strides() == values.strides() &&
                  keys.stride(2) == D,
              "vlmkit::decode_attention_bf16: keys/values need contiguous rows");
  at::Tensor query = q.contiguous();
  at::Tensor mask;
  if (valid.has_value() && valid->defined()) {
    mask = valid->to(at::kBool).reshape({B, -1}).contiguous();
    TORCH_CHECK(mask.size(1) == L, "vlmkit::decode_attention_bf16: mask covers ", mask.size(1), " keys, not ", L);
  }
  at::Tensor out = at::empty({B, 1, H, D}, q.options());
  const BFloat16* qp = query.const_data_ptr<BFloat16>();
  const BFloat16* kp = keys.const_data_ptr<BFloat16>();
  const BFloat16* vp = values.const_data_ptr<BFloat16>();
  const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  BFloat16* op = out.data_ptr<BFloat16>();
  attend_all(B, H, Hkv, [&](int64_t b, int64_t kv, int64_t first, int64_t heads) {
    const int64_t offset = b * keys.stride(0) + kv * keys.stride(1);
    attend_heads(qp + (b * H + first) * D, heads, kp + offset, vp + offset, D, L, D, static_cast<float>(scale),
                 mp ? mp + b * L : nullptr, op + (b * H + first) * D);
  });
  return out.transpose(1, 2);
}

// Weights are lists of their parts (products.h): bf16, int8 or 4-bit, mixed as the layer holds them.
at::Tensor decoder_layer_step_bf16(const at::Tensor& hidden, const at::Tensor& input_norm,
                                   const at::Tensor& post_attention_norm, double eps, at::TensorList q,
                                   at::TensorList k, at::TensorList v, at::TensorList qkv_bias, at::TensorList o,
                                   at::TensorList o_bias, at::TensorList gate, at::TensorList up,
                                   at::TensorList down, const at::Tensor& cos, const at::Tensor& sin,
                                   const at::Tensor& key_cache, const at::Tensor& value_cache, int64_t position,
                                   const std::optional<at::Tensor>& valid, int64_t num_heads) {
  const int64_t B = hidden.size(0), D = hidden.size(-1);
  const int64_t Hkv = key_cache.size(1), max_len = key_cache.size(2), hd = key_cache.size(3), H = num_heads;
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 && hidden.numel() == B * D,
              kLayerStep, ": hidden must be bf16 [B, 1, D]");
  TORCH_CHECK(position < max_len && key_cache.stride(3) == 1 && key_cache.stride(2) == hd &&
                  key_cache.strides() == value_cache.strides() && key_cache.scalar_type() == at::kBFloat16 &&
                  value_cache.scalar_type() == at::kBFloat16 && hd % 8 == 0 && H % Hkv == 0,
              kLayerStep, ": unexpected KV cache layout");
  at::Tensor hidden_f = hidden.reshape({B, D}).to(at::kFloat).contiguous();
  std::vector<float> x(hidden_f.const_data_ptr<float>(), hidden_f.const_data_ptr<float>() + B * D);
  std::vector<float> normed(B * D);
  const float epsilon = static_cast<float>(eps);
  const auto norm_rows = [&](const at::Tensor& weight) {  // every row of x, into normed
    const BFloat16* w = weight.const_data_ptr<BFloat16>();
    for (int64_t b = 0; b < B; ++b) rms_norm_row(&x[b * D], D, w, epsilon, &normed[b * D]);
  };

  // attention block
  norm_rows(input_norm);
  const Projection qkv(normed.data(), B, D, {q, k, v}, qkv_bias);
  const std::vector<int64_t>& rows = qkv.rows;
  TORCH_CHECK(rows[0] == H * hd && rows[1] == Hkv * hd && rows[2] == Hkv * hd,
              kLayerStep, ": q/k/v sizes do not match the heads");
  const int64_t N = qkv.N;

  at::Tensor cos_c = cos.reshape({B, hd}).contiguous(), sin_c = sin.reshape({B, hd}).contiguous();
  const BFloat16* cp = cos_c.const_data_ptr<BFloat16>();
  const BFloat16* sp = sin_c.const_data_ptr<BFloat16>();
  BFloat16* kc = key_cache.data_ptr<BFloat16>();
  BFloat16* vc = value_cache.data_ptr<BFloat16>();
  std::vector<BFloat16> queries(B * H * hd);
  for (int64_t b = 0; b < B; ++b) {
    const float* row = qkv.y.data() + b * N;
    for (int64_t h = 0; h < H; ++h) rotate(row + h * hd, cp + b * hd, sp + b * hd, hd, &queries[(b * H + h) * hd]);
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t slot = b * key_cache.stride(0) + h * key_cache.stride(1) + position * hd;
      rotate(row + rows[0] + h * hd, cp + b * hd, sp + b * hd, hd, kc + slot);
      for (int64_t i = 0; i < hd; ++i) vc[slot + i] = static_cast<BFloat16>(row[rows[0] + rows[1] + h * hd + i]);
    }
  }
  at::Tensor mask;
  if (valid.has_value() && valid->defined()) mask = valid->to(at::kBool).reshape({B, -1}).contiguous();
  const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const int64_t L = position + 1;
  TORCH_CHECK(mp == nullptr || mask.size(1) == L, kLayerStep, ": mask does not cover the keys");
  std::vector<BFloat16> attended(B * H * hd);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  attend_all(B, H, Hkv, [&](int64_t b, int64_t kv, int64_t first, int64_t heads) {
    const int64_t offset = b * key_cache.stride(0) + kv * key_cache.stride(1);
    attend_heads(&queries[(b * H + first) * hd], heads, kc + offset, vc + offset, hd, L, hd, scale,
                 mp ? mp + b * L : nullptr, &attended[(b * H + first) * hd]);
  });
  std::vector<float> attended_f(attended.begin(), attended.end());
  const Projection attention_out(attended_f.data(), B, H * hd, {o}, o_bias);
  TORCH_CHECK(attention_out.N == D, kLayerStep, ": the output projection gives ", attention_out.N, " features, not ", D);
  add_rounded(x.data(), attention_out.y.data(), B * D);

  // MLP block: down(silu(gate(x)) * up(x))
  norm_rows(post_attention_norm);
  const Projection gate_up(normed.data(), B, D, {gate, up}, {});
  const int64_t I = gate_up.rows[0];
  TORCH_CHECK(gate_up.rows[1] == I, kLayerStep, ": gate and up projections differ in size");
  const std::vector<float>& gated = gate_up.y;
  std::vector<float> product(B * I);
  for (int64_t b = 0; b < B; ++b) {
    const float* gate_row = gated.data() + b * 2 * I;
    const float* up_row = gate_row + I;
    int64_t j = 0;
    for (; j + 8 <= I; j += 8) {  // exp8 is within 2 ulp of std::exp: rounded to bf16 they almost always agree
      const __m256 g = _mm256_loadu_ps(gate_row + j);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 silu = widen_bf16x8(round_to_bf16x8(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e))));
      _mm256_storeu_ps(&product[b * I + j], widen_bf16x8(round_to_bf16x8(_mm256_mul_ps(silu, _mm256_loadu_ps(up_row + j)))));
    }
    for (; j < I; ++j) {
      const float g = gate_row[j];
      product[b * I + j] = bf16_round(bf16_round(g / (1.f + std::exp(-g))) * up_row[j]);
    }
  }
  const Projection mlp_out(product.data(), B, I, {down}, {});
  TORCH_CHECK(mlp_out.N == D, kLayerStep, ": the down projection gives ", mlp_out.N, " features, not ", D);
  at::Tensor result = at::empty({B, 1, D}, hidden.options());
  BFloat16* rp = result.data_ptr<BFloat16>();
  add_rounded(x.data(), mlp_out.y.data(), B * D);
  std::copy(x.begin(), x.end(), rp);
  return result;
}

}  // namespace vlmkit
