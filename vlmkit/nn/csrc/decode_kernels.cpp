// vlmkit's decode kernels for x86 CPUs with AVX2 (the bf16 ones are for CPUs without native bf16 arithmetic).
//
// linear_bf16: y = x @ W^T (+ b) for bf16 weights W [N, K] and a few activation rows x [B, K], for one
// or several weights reading the same x (q/k/v, gate/up). A decode step multiplies a handful of rows by
// every weight once, so it is bound by how fast weights stream from memory; torch's bf16 matmul is
// compute-bound well below that here. Each 8-wide bf16 load is widened to fp32 in registers (bf16 is
// the top half of an fp32) and fed to FMAs with fp32 accumulation, then rounded to bf16 once.
//
// decode_attention_bf16: one query position against the KV cache (softmax(q k^T * scale) v), fp32
// inside, for the decode step, where torch's SDPA has more setup than work.
//
// linear_int8, linear_int4: the same streaming for vlmkit's weight-only int8 and 4-bit layers (with
// dequantize_int4, which widens 4-bit weights for many-row products).
//
// decoder_layer_step_bf16: a whole LLaMA/Qwen2 decoder layer for one new position (norms, q/k/v,
// rotary, KV cache write, attention, output projection, gated MLP, residuals) in one call, which
// spares a decode step the ~40 small torch ops and Python calls per layer around the matmuls.
//
// Threads: work is cut into chunks that the calling thread and helper threads claim from a shared
// counter; the caller returns as soon as every chunk is done. Unlike a fork-join barrier, a helper
// that the OS has not scheduled (a busy machine) is simply not waited for.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <pthread.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace {

using c10::BFloat16;

// ---------------------------------------------------------------------------------------------------
// Chunked work sharing without a barrier.

class WorkPool {
 public:
  static WorkPool& get() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { instance() = new WorkPool(); }); });
    return *instance();
  }

  // fn(chunk) for every chunk in [0, chunks), on this thread and up to threads - 1 helpers.
  void run(int64_t chunks, int threads, const std::function<void(int64_t)>& fn) {
    if (threads <= 1 || chunks <= 1) {
      for (int64_t c = 0; c < chunks; ++c) fn(c);
      return;
    }
    auto job = std::make_shared<Job>(chunks, &fn);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(helpers_.size()) < threads - 1) helpers_.emplace_back([this] { helper_loop(); });
      current_ = job;
      published_.store(++generation_, std::memory_order_release);
    }
    wake_.notify_all();
    work(*job);
    for (int spins = 0; job->done.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 4096) {
        _mm_pause();
      } else {
        std::this_thread::yield();  // a helper mid-chunk may need this core
      }
    }
  }

 private:
  struct Job {
    Job(int64_t chunks, const std::function<void(int64_t)>* fn) : chunks(chunks), fn(fn) {}
    std::atomic<int64_t> next{0}, done{0};
    const int64_t chunks;
    const std::function<void(int64_t)>* fn;  // valid until done == chunks
  };

  static WorkPool*& instance() {
    static WorkPool* pool = new WorkPool();  // never destroyed: helpers run until the process ends
    return pool;
  }

  static void work(Job& job) {
    for (;;) {
      const int64_t chunk = job.next.fetch_add(1, std::memory_order_relaxed);
      if (chunk >= job.chunks) return;
      (*job.fn)(chunk);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  void helper_loop() {
    uint64_t seen = 0;
    for (;;) {
      // decode steps call back to back: spin a little before sleeping
      for (int i = 0; i < 2000 && published_.load(std::memory_order_acquire) == seen; ++i) _mm_pause();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = current_;
      }
      work(*job);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> current_;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> published_{0};
  std::vector<std::thread> helpers_;
};

void parallel_chunks(int64_t chunks, const std::function<void(int64_t)>& fn) {
  WorkPool::get().run(chunks, at::get_num_threads(), fn);
}

// ---------------------------------------------------------------------------------------------------
// Vector helpers.

inline __m256 load_bf16x8(const BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// int8 weights (symmetric, one scale per output row applied after the sum) widen the same way.
inline __m256 load_bf16x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// ---------------------------------------------------------------------------------------------------
// linear_bf16

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

// y [B, sum of N_i] (fp32) = x [B, K] (fp32) times each weight W_i [N_i, K] (bf16 or int8), side by side.
template <typename W>
void multi_product(const float* x, int64_t B, int64_t K, const std::vector<const W*>& weights,
                   const std::vector<int64_t>& rows, float* y) {
  std::vector<int64_t> first_block{0}, first_column{0};
  for (int64_t n : rows) {
    first_block.push_back(first_block.back() + (n + kRowsPerBlock - 1) / kRowsPerBlock);
    first_column.push_back(first_column.back() + n);
  }
  const int64_t N = first_column.back(), blocks = first_block.back();
  parallel_chunks((blocks + kBlocksPerChunk - 1) / kBlocksPerChunk, [&](int64_t chunk) {
    size_t which = 0;
    const int64_t end = std::min(blocks, (chunk + 1) * kBlocksPerChunk);
    for (int64_t block = chunk * kBlocksPerChunk; block < end; ++block) {
      while (block >= first_block[which + 1]) ++which;
      const int64_t row = (block - first_block[which]) * kRowsPerBlock;
      const int64_t count = std::min(kRowsPerBlock, rows[which] - row);
      // this weight's outputs start at its first column of the shared output
      rows_product(x, B, K, weights[which], row, count, y + first_column[which], N);
    }
  });
}

void check_weights(at::TensorList weights, int64_t K, std::vector<const BFloat16*>& data, std::vector<int64_t>& rows) {
  for (const at::Tensor& w : weights) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
                    w.device().is_cpu(),
                "vlmkit: weights must be contiguous 2-d bf16 CPU tensors of width ", K);
    data.push_back(w.const_data_ptr<BFloat16>());
    rows.push_back(w.size(0));
  }
}

std::vector<at::Tensor> linear_bf16(const at::Tensor& input, at::TensorList weights, at::TensorList biases) {
  TORCH_CHECK(!weights.empty(), "vlmkit::linear_bf16 needs at least one weight");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), "vlmkit::linear_bf16: one bias per weight, or none");
  TORCH_CHECK(input.device().is_cpu(), "vlmkit::linear_bf16 runs on the CPU");
  const int64_t K = weights[0].size(1);
  TORCH_CHECK(input.size(-1) == K, "vlmkit::linear_bf16: input has ", input.size(-1), " features, weight ", K);
  std::vector<const BFloat16*> data;
  std::vector<int64_t> rows;
  check_weights(weights, K, data, rows);
  at::Tensor x = input.reshape({-1, K}).to(at::kFloat).contiguous();
  int64_t N = 0;
  for (int64_t n : rows) N += n;
  at::Tensor sums = at::empty({x.size(0), N}, x.options());
  multi_product(x.const_data_ptr<float>(), x.size(0), K, data, rows, sums.data_ptr<float>());
  std::vector<at::Tensor> outputs;
  std::vector<int64_t> shape = input.sizes().vec();
  at::Tensor out;
  if (!biases.empty()) {
    int64_t column = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      sums.narrow(1, column, rows[i]).add_(biases[i].to(at::kFloat));
      column += rows[i];
    }
  }
  out = sums.to(input.scalar_type());
  int64_t column = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    shape.back() = rows[i];
    outputs.push_back(out.narrow(1, column, rows[i]).view(shape));
    column += rows[i];
  }
  return outputs;
}

// ---------------------------------------------------------------------------------------------------
// decode_attention_bf16

// One (batch row, head): softmax over the valid keys of scale * q.k, then the weighted sum of values.
void attend_one(const BFloat16* q, const BFloat16* k, const BFloat16* v, int64_t key_stride, int64_t L, int64_t D,
                float scale, const bool* valid, BFloat16* out, std::vector<float>& scores) {
  std::vector<float> qf(D);
  for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(q[d]) * scale;
  scores.resize(L);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) {
    if (valid != nullptr && !valid[j]) {
      scores[j] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const BFloat16* key = k + j * key_stride;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(load_bf16x8(key + d), _mm256_loadu_ps(&qf[d]), acc);
    scores[j] = horizontal_sum(acc);
    top = std::max(top, scores[j]);
  }
  std::vector<float> acc(D, 0.f);
  float total = 0.f;
  if (top > -std::numeric_limits<float>::infinity()) {
    for (int64_t j = 0; j < L; ++j) {
      const float p = std::exp(scores[j] - top);
      if (p == 0.f) continue;
      total += p;
      const __m256 pv = _mm256_set1_ps(p);
      const BFloat16* value = v + j * key_stride;
      for (int64_t d = 0; d < D; d += 8) {
        _mm256_storeu_ps(&acc[d], _mm256_fmadd_ps(load_bf16x8(value + d), pv, _mm256_loadu_ps(&acc[d])));
      }
    }
  }
  // a row with no valid key (a pad position) gets zeros, as torch's SDPA gives
  const float norm = total > 0.f ? 1.f / total : 0.f;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<BFloat16>(acc[d] * norm);
}

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
  const int64_t group = H / Hkv;
  parallel_chunks(B * H, [&](int64_t task) {
    thread_local std::vector<float> scores;
    const int64_t b = task / H, h = task % H, kv = h / group;
    const int64_t offset = b * keys.stride(0) + kv * keys.stride(1);
    attend_one(qp + (b * H + h) * D, kp + offset, vp + offset, D, L, D, static_cast<float>(scale),
               mp ? mp + b * L : nullptr, op + (b * H + h) * D, scores);
  });
  return out.transpose(1, 2);
}

// linear_int8: y = (x @ q.T) * scale + bias for int8 weights q [N, K] with one scale per output row;
// half the bytes of bf16 per weight, widened in registers like the bf16 path.
at::Tensor linear_int8(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.device().is_cpu(),
              "vlmkit::linear_int8: weight must be a contiguous 2-d int8 CPU tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(input.size(-1) == K && scale.numel() == N, "vlmkit::linear_int8: shapes do not match");
  at::Tensor x = input.reshape({-1, K}).to(at::kFloat).contiguous();
  at::Tensor sums = at::empty({x.size(0), N}, x.options());
  multi_product<int8_t>(x.const_data_ptr<float>(), x.size(0), K, {weight.const_data_ptr<int8_t>()}, {N},
                        sums.data_ptr<float>());
  sums.mul_(scale.to(at::kFloat).reshape({1, N}));
  if (bias.has_value() && bias->defined()) sums.add_(bias->to(at::kFloat).reshape({1, N}));
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = N;
  return sums.to(input.scalar_type()).reshape(shape);
}

// linear_int4: y = x @ W^T (+ b) for 4-bit weights stored as vlmkit saves them: uint8 [N, K / 2], two
// values per byte (high nibble first), in groups of G inputs with a scale s and a zero point z each,
// w = (q - 8) * s + z. A quarter of bf16's bytes per weight. Per group the sum is
// s * sum(q x) + (z - 8 s) * sum(x): the inner loop multiplies the bare values 0..15, and the sums of x
// per group are taken once per call. Unpacking takes two instructions per 8 weights: 16 bytes widen to
// eight 32-bit lanes of four nibbles, and the i-th vector keeps nibble i of each lane where it is
// (a mask) and converts it: q * 16^i, exact in fp32. Lane j of the i-th vector is input
// 4 j + (1, 0, 3, 2)[i] of the 32; the activations are put in that order, and scaled by 16^-i
// (exact too), once per call.
inline __m256 nibble_times_power(__m256i lanes, int i) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32(15 << (4 * i))));
}

template <int ROWS_X, typename S>
void int4_rows(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w, const S* scale,
               const S* zero, int64_t row, int64_t rows, float* y, int64_t N) {
  constexpr int U = ROWS_X == 1 ? 4 : (ROWS_X == 2 ? 2 : 1);
  const int64_t groups = K / G;
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
      const float s = static_cast<float>(scale[r * groups + g]), z = static_cast<float>(zero[r * groups + g]);
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

template <typename S>
void int4_product(const float* x, const float* xsum, int64_t B, int64_t K, int64_t G, const uint8_t* w,
                  const S* scale, const S* zero, int64_t row, int64_t rows, float* y, int64_t N) {
  const int64_t groups = K / G;
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const float *xb = x + b0 * K, *sb = xsum + b0 * groups;
    float* yb = y + b0 * N;
    switch (std::min<int64_t>(4, B - b0)) {
      case 1: int4_rows<1>(xb, sb, K, G, w, scale, zero, row, rows, yb, N); break;
      case 2: int4_rows<2>(xb, sb, K, G, w, scale, zero, row, rows, yb, N); break;
      case 3: int4_rows<3>(xb, sb, K, G, w, scale, zero, row, rows, yb, N); break;
      default: int4_rows<4>(xb, sb, K, G, w, scale, zero, row, rows, yb, N); break;
    }
  }
}

at::Tensor linear_int4(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& zero, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous() &&
                  weight.device().is_cpu(),
              "vlmkit::linear_int4: weight must be a contiguous 2-d uint8 CPU tensor (two values per byte)");
  const int64_t N = weight.size(0), K = weight.size(1) * 2;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.sizes() == zero.sizes() && K % scale.size(1) == 0 &&
                  (K / scale.size(1)) % 32 == 0 && input.size(-1) == K,
              "vlmkit::linear_int4: input [..., K], weight [N, K / 2], scale and zero [N, K / G], G a multiple of 32");
  const int64_t G = K / scale.size(1);
  at::Tensor x = input.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t B = x.size(0), groups = K / G;
  // per group sums, and the nibble order: ordered[b, block, i, j] = x[b, 32 block + 4 j + (1, 0, 3, 2)[i]] * 16^-i
  // (a plain loop: a decode step makes ~170 of these calls, and torch ops cost microseconds each)
  const float* xin = x.const_data_ptr<float>();
  std::vector<float> ordered(B * K), xsum(B * groups, 0.f);
  constexpr int kNibble[4] = {1, 0, 3, 2};
  constexpr float kPower[4] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) xsum[b * groups + k / G] += xin[b * K + k];
    for (int64_t block = b * K; block < (b + 1) * K; block += 32) {
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 8; ++j) ordered[block + 8 * i + j] = xin[block + 4 * j + kNibble[i]] * kPower[i];
      }
    }
  }
  // bf16 scales and zero points are read as they are; any other float dtype is widened once per call
  const bool bf16 = scale.scalar_type() == at::kBFloat16 && zero.scalar_type() == at::kBFloat16;
  at::Tensor s = bf16 ? scale.contiguous() : scale.to(at::kFloat).contiguous();
  at::Tensor z = bf16 ? zero.contiguous() : zero.to(at::kFloat).contiguous();
  at::Tensor sums = at::empty({B, N}, x.options());
  const float *xp = ordered.data(), *sp = xsum.data();
  const uint8_t* wp = weight.const_data_ptr<uint8_t>();
  float* yp = sums.data_ptr<float>();
  constexpr int64_t kRowsPerChunk = kRowsPerBlock * kBlocksPerChunk;
  parallel_chunks((N + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    const int64_t row = chunk * kRowsPerChunk, rows = std::min(kRowsPerChunk, N - row);
    if (bf16) {
      int4_product(xp, sp, B, K, G, wp, s.const_data_ptr<BFloat16>(), z.const_data_ptr<BFloat16>(), row, rows, yp, N);
    } else {
      int4_product(xp, sp, B, K, G, wp, s.const_data_ptr<float>(), z.const_data_ptr<float>(), row, rows, yp, N);
    }
  });
  if (bias.has_value() && bias->defined()) sums.add_(bias->to(at::kFloat).reshape({1, N}));
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = N;
  return sums.to(input.scalar_type()).reshape(shape);
}

// dequantize_int4: the float32 weight [N, K] of linear_int4's operands, for many-row products (prefill),
// which widen a block of rows at a time and run the float GEMM: a table of the 16 values per group.
at::Tensor dequantize_int4(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.device().is_cpu() &&
                  scale.dim() == 2 && scale.size(0) == weight.size(0) && zero.sizes() == scale.sizes() &&
                  weight.size(1) * 2 % scale.size(1) == 0 && (weight.size(1) * 2 / scale.size(1)) % 2 == 0,
              "vlmkit::dequantize_int4: weight uint8 [N, K / 2] on the CPU, scale and zero [N, K / G]");
  const int64_t N = weight.size(0), K = weight.size(1) * 2, groups = scale.size(1), G = K / groups;
  at::Tensor w = weight.contiguous(), s = scale.to(at::kFloat).contiguous(), z = zero.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({N, K}, s.options());
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const float *sp = s.const_data_ptr<float>(), *zp = z.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kRowsPerChunk = 16;
  parallel_chunks((N + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    float table[16];
    for (int64_t r = chunk * kRowsPerChunk; r < std::min(N, (chunk + 1) * kRowsPerChunk); ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        for (int q = 0; q < 16; ++q) table[q] = static_cast<float>(q - 8) * sp[r * groups + g] + zp[r * groups + g];
        const uint8_t* bytes = wp + r * (K / 2) + g * (G / 2);
        float* row = op + r * K + g * G;
        for (int64_t j = 0; j < G / 2; ++j) {
          row[2 * j] = table[bytes[j] >> 4];
          row[2 * j + 1] = table[bytes[j] & 15];
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// decoder_layer_step_bf16: one LLaMA/Qwen2 decoder layer for one new position, in one call.
// Every intermediate is rounded to bf16 where torch's bf16 ops round it (after each norm, projection,
// rotary product and sum, activation, product and residual sum), so it computes what the Python layer
// computes, up to the order of sums.

inline float bf16_round(float v) { return static_cast<float>(static_cast<BFloat16>(v)); }

// RMSNorm as the references write it: fp32 statistics, x * rsqrt(mean(x^2) + eps) rounded, times weight.
void rms_norm_rows(const float* x, int64_t B, int64_t D, const BFloat16* weight, float eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* row = x + b * D;
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256 v = _mm256_loadu_ps(row + d);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float squares = horizontal_sum(acc);
    for (; d < D; ++d) squares += row[d] * row[d];
    const float inverse = 1.f / std::sqrt(squares / static_cast<float>(D) + eps);
    for (d = 0; d < D; ++d) out[b * D + d] = bf16_round(static_cast<float>(weight[d]) * bf16_round(row[d] * inverse));
  }
}

void add_bias_and_round(float* y, int64_t B, int64_t N, at::TensorList biases, const std::vector<int64_t>& rows) {
  if (!biases.empty()) {
    int64_t column = 0;
    for (size_t i = 0; i < biases.size(); ++i) {
      at::Tensor bias = biases[i].to(at::kFloat).contiguous();
      const float* bp = bias.const_data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = 0; j < rows[i]; ++j) y[b * N + column + j] += bp[j];
      }
      column += rows[i];
    }
  }
  for (int64_t i = 0; i < B * N; ++i) y[i] = bf16_round(y[i]);
}

// x * cos + rotate_half(x) * sin for one head, with torch's bf16 rounding of each product and the sum.
inline void rotate(const float* x, const BFloat16* cos, const BFloat16* sin, int64_t hd, BFloat16* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; ++i) {
    const float turned = i < half ? -x[i + half] : x[i - half];
    out[i] = static_cast<BFloat16>(bf16_round(x[i] * static_cast<float>(cos[i])) +
                                   bf16_round(turned * static_cast<float>(sin[i])));
  }
}

at::Tensor decoder_layer_step_bf16(const at::Tensor& hidden, const at::Tensor& input_norm,
                                   const at::Tensor& post_attention_norm, double eps, at::TensorList qkv,
                                   at::TensorList qkv_bias, const at::Tensor& o_weight, at::TensorList o_bias,
                                   at::TensorList gate_up, const at::Tensor& down, const at::Tensor& cos,
                                   const at::Tensor& sin, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                   int64_t position, const std::optional<at::Tensor>& valid, int64_t num_heads) {
  const int64_t B = hidden.size(0), D = hidden.size(-1);
  const int64_t Hkv = key_cache.size(1), max_len = key_cache.size(2), hd = key_cache.size(3), H = num_heads;
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 && hidden.numel() == B * D,
              "vlmkit::decoder_layer_step_bf16: hidden must be bf16 [B, 1, D]");
  TORCH_CHECK(qkv.size() == 3 && gate_up.size() == 2 && (qkv_bias.empty() || qkv_bias.size() == 3),
              "vlmkit::decoder_layer_step_bf16: q/k/v and gate/up weights expected");
  TORCH_CHECK(position < max_len && key_cache.stride(3) == 1 && key_cache.stride(2) == hd &&
                  key_cache.strides() == value_cache.strides() && key_cache.scalar_type() == at::kBFloat16 &&
                  value_cache.scalar_type() == at::kBFloat16 && hd % 8 == 0 && H % Hkv == 0,
              "vlmkit::decoder_layer_step_bf16: unexpected KV cache layout");
  at::Tensor hidden_f = hidden.reshape({B, D}).to(at::kFloat).contiguous();
  std::vector<float> x(hidden_f.const_data_ptr<float>(), hidden_f.const_data_ptr<float>() + B * D);
  std::vector<float> normed(B * D);
  const float epsilon = static_cast<float>(eps);

  // attention block
  rms_norm_rows(x.data(), B, D, input_norm.const_data_ptr<BFloat16>(), epsilon, normed.data());
  std::vector<const BFloat16*> weights;
  std::vector<int64_t> rows;
  check_weights(qkv, D, weights, rows);
  TORCH_CHECK(rows[0] == H * hd && rows[1] == Hkv * hd && rows[2] == Hkv * hd,
              "vlmkit::decoder_layer_step_bf16: q/k/v sizes do not match the heads");
  const int64_t N = rows[0] + rows[1] + rows[2];
  std::vector<float> projected(B * N);
  multi_product(normed.data(), B, D, weights, rows, projected.data());
  add_bias_and_round(projected.data(), B, N, qkv_bias, rows);

  at::Tensor cos_c = cos.reshape({B, hd}).contiguous(), sin_c = sin.reshape({B, hd}).contiguous();
  const BFloat16* cp = cos_c.const_data_ptr<BFloat16>();
  const BFloat16* sp = sin_c.const_data_ptr<BFloat16>();
  BFloat16* kc = key_cache.data_ptr<BFloat16>();
  BFloat16* vc = value_cache.data_ptr<BFloat16>();
  std::vector<BFloat16> queries(B * H * hd);
  for (int64_t b = 0; b < B; ++b) {
    const float* row = projected.data() + b * N;
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
  const int64_t L = position + 1, group = H / Hkv;
  TORCH_CHECK(mp == nullptr || mask.size(1) == L, "vlmkit::decoder_layer_step_bf16: mask does not cover the keys");
  std::vector<BFloat16> attended(B * H * hd);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  parallel_chunks(B * H, [&](int64_t task) {
    thread_local std::vector<float> scores;
    const int64_t b = task / H, h = task % H;
    const int64_t offset = b * key_cache.stride(0) + (h / group) * key_cache.stride(1);
    attend_one(&queries[task * hd], kc + offset, vc + offset, hd, L, hd, scale, mp ? mp + b * L : nullptr,
               &attended[task * hd], scores);
  });
  std::vector<float> attended_f(attended.begin(), attended.end());
  std::vector<float> out(B * D);
  weights.clear();
  rows.clear();
  check_weights({o_weight}, H * hd, weights, rows);
  multi_product(attended_f.data(), B, H * hd, weights, rows, out.data());
  add_bias_and_round(out.data(), B, D, o_bias, rows);
  for (int64_t i = 0; i < B * D; ++i) x[i] = bf16_round(x[i] + out[i]);

  // MLP block: down(silu(gate(x)) * up(x))
  rms_norm_rows(x.data(), B, D, post_attention_norm.const_data_ptr<BFloat16>(), epsilon, normed.data());
  weights.clear();
  rows.clear();
  check_weights(gate_up, D, weights, rows);
  const int64_t I = rows[0];
  TORCH_CHECK(rows[1] == I && down.size(1) == I && down.size(0) == D, "vlmkit::decoder_layer_step_bf16: MLP sizes");
  std::vector<float> gated(B * 2 * I);
  multi_product(normed.data(), B, D, weights, rows, gated.data());
  add_bias_and_round(gated.data(), B, 2 * I, {}, rows);
  std::vector<float> product(B * I);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < I; ++j) {
      const float g = gated[b * 2 * I + j], u = gated[b * 2 * I + I + j];
      product[b * I + j] = bf16_round(bf16_round(g / (1.f + std::exp(-g))) * u);
    }
  }
  weights.clear();
  rows.clear();
  check_weights({down}, I, weights, rows);
  multi_product(product.data(), B, I, weights, rows, out.data());
  add_bias_and_round(out.data(), B, D, {}, rows);
  at::Tensor result = at::empty({B, 1, D}, hidden.options());
  BFloat16* rp = result.data_ptr<BFloat16>();
  for (int64_t i = 0; i < B * D; ++i) rp[i] = static_cast<BFloat16>(x[i] + out[i]);
  return result;
}

}  // namespace

TORCH_LIBRARY(vlmkit, m) {
  m.def("linear_bf16(Tensor input, Tensor[] weights, Tensor[] biases) -> Tensor[]");
  m.def("linear_int8(Tensor input, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor input, Tensor weight, Tensor scale, Tensor zero, Tensor? bias) -> Tensor");
  m.def("dequantize_int4(Tensor weight, Tensor scale, Tensor zero) -> Tensor");
  m.def("decode_attention_bf16(Tensor q, Tensor keys, Tensor values, Tensor? valid, float scale) -> Tensor");
  m.def("decoder_layer_step_bf16(Tensor hidden, Tensor input_norm, Tensor post_attention_norm, float eps, "
        "Tensor[] qkv, Tensor[] qkv_bias, Tensor o_weight, Tensor[] o_bias, Tensor[] gate_up, Tensor down, "
        "Tensor cos, Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, int position, Tensor? valid, "
        "int num_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlmkit, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("dequantize_int4", &dequantize_int4);
  m.impl("decode_attention_bf16", &decode_attention_bf16);
  m.impl("decoder_layer_step_bf16", &decoder_layer_step_bf16);
}
