// Matrix-vector products for decode steps: y = x @ W^T for a few activation rows x [B, K] (fp32) and one
// or several weights W_i [N_i, K] reading the same x (q/k/v, gate/up), side by side in y [B, sum N_i].
// A decode step multiplies a handful of rows by every weight once, so it is bound by how fast weights
// stream from memory: each weight row is read front to back (the AVX2 bf16 and int8 kernels read four rows
// at once, each the start of its own sequential stream); bf16 rows are widened to fp32 in registers,
// quantized ones multiplied as integers against the activations rounded to int16 (int8 weights) or to int8
// per weight group (4-bit weights).
//
// Weights come in the forms vlmkit stores: bf16 [N, K]; int8 [N, K] with one scale per output row
// (applied after the sum); or 4-bit, uint8 [N, K / 2] (two values per byte, high nibble first) in
// groups of G inputs with a scale s and a zero point z each, w = (q - 8) * s + z.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace vlmkit {

using c10::BFloat16;

// 8 bf16 values widened to fp32 (bf16 is the top half of an fp32).
inline __m256 load_bf16x8(const BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// v rounded to bf16 and back: where torch's bf16 ops round an intermediate.
inline float bf16_round(float v) { return static_cast<float>(static_cast<BFloat16>(v)); }

// 8 fp32 values rounded to bf16 (to nearest, ties to even, as c10::BFloat16 rounds; NaN stays NaN).
inline __m128i round_to_bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

// 8 bf16 values (as rounded by round_to_bf16x8) widened to fp32.
inline __m256 widen_bf16x8(__m128i bits) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)); }

// 8 values of a row that is bf16, or fp32 holding bf16 values (the decode step's activations), as fp32; and 8
// bf16 results stored as such, or widened back to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BFloat16* p) { return load_bf16x8(p); }
inline void store8(BFloat16* p, __m128i bits) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits); }
inline void store8(float* p, __m128i bits) { _mm256_storeu_ps(p, widen_bf16x8(bits)); }

// fp32 values [0, n) rounded to bf16 into out, on vlmkit's threads for long runs (torch's conversion would
// wake its OpenMP threads, which then spin on the cores the next kernel call needs).
void round_to_bf16(const float* values, int64_t n, BFloat16* out);

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// How far ahead of its reads a row kernel asks for weight bytes (the AVX-512 kernels, and the AVX2 4-bit one;
// the AVX2 bf16 and int8 kernels read several streams at once instead, see in_streams in products_avx2.cpp). On
// 2 Zen 4 cores (2026-12-06), 4 KiB against 1 KiB made the AVX-512 kernels' Janus-Pro-1B layer products 9%
// (int4) and 14-17% (int8, 1 and 2 rows) faster; 8 KiB was 6-9% faster than 4 KiB while the memory ran at its
// fastest (80 GB/s) but 2-3% slower at 47.
constexpr int64_t kPrefetchBytes = 4096;

// One weight as the products read it. `parts` holds its tensors: {bf16 weight}, {int8 weight, scale}
// or {uint8 nibbles, scale, zero}; scales and zero points may be bf16 or fp32.
struct PackedWeight {
  enum class Kind { kBFloat16, kInt8, kInt4 };

  PackedWeight(at::TensorList parts, int64_t K, const char* op);
  bool quantized() const { return kind != Kind::kBFloat16; }
  float scale_at(int64_t i) const { return bf16_scales ? static_cast<float>(scale_bf16[i]) : scale_f32[i]; }
  const void* scales() const { return bf16_scales ? static_cast<const void*>(scale_bf16) : scale_f32; }
  const void* zeros() const { return bf16_scales ? static_cast<const void*>(zero_bf16) : zero_f32; }

  Kind kind;
  int64_t N, K, G = 0;  // G: inputs per int4 group
  const void* data;
  bool bf16_scales = false;
  const BFloat16 *scale_bf16 = nullptr, *zero_bf16 = nullptr;
  const float *scale_f32 = nullptr, *zero_f32 = nullptr;

 private:
  at::Tensor scale_, zero_;  // kept alive (contiguous copies where the originals were not)
};

// Each weight's parts (a list per weight) packed for weights_product, and the sum of their output widths.
struct PackedWeights {
  PackedWeights(const std::vector<at::TensorList>& weights, int64_t K, const char* op);
  std::vector<PackedWeight> list;
  int64_t N = 0;
};

// y [B, sum of N_i] (fp32, row stride sum N_i) = x [B, K] (fp32, contiguous) times each weight, one
// parallel pass over all of them, by the row kernels of the instruction set chosen with set_kernel_isa.
void weights_product(const float* x, int64_t B, int64_t K, const std::vector<PackedWeight>& weights, float* y);

// The instruction set weights_product uses: "avx2" (every x86 CPU with AVX2 and FMA) or "avx512"
// (AVX-512 F/BW/VL with BF16 and VNNI; the caller checks the CPU has them). False, and nothing changed,
// for a name this build does not have.
bool set_kernel_isa(const std::string& isa);
std::string kernel_isa();

// Functions that use AVX-512 BF16/VNNI carry this attribute (compilers too old for it build none of them);
// only functions so marked may use those instructions, and only after set_kernel_isa chose them. Built with
// VLMKIT_EMULATED_AVX512 the same functions use SIMDe's portable intrinsics instead (emulated_avx512.h).
#if defined(VLMKIT_EMULATED_AVX512)
#define VLMKIT_HAVE_AVX512 1
#define VLMKIT_AVX512
#elif defined(__GNUC__) && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define VLMKIT_HAVE_AVX512 1
#define VLMKIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni")))
#else
#define VLMKIT_HAVE_AVX512 0
#endif

// The row kernels of weights_product: rows [row, row + rows) of one weight against B activation rows, into
// y [B, N] (row stride N). products_avx2.cpp: for every CPU with AVX2 and FMA; products_avx512.cpp: for
// AVX-512 BF16/VNNI (compiled there with their own target attributes). bf16 weights take the activations as
// fp32 (AVX2) or bf16 (AVX-512) values; quantized ones as products.cpp rounds them, for int8 weights: values
// int16 [B, K], scale [B]; for 4-bit weights: values int8 [B, K] in span order, scale and group_sums [B, K / G].
struct GroupActivationsView {
  const int8_t* values;
  const float* scale;
  const float* group_sums;
};
// Activation rows [0, B) in blocks of up to four: block(b0, count), count a std::integral_constant<int, 1..4>, so a
// row kernel is compiled for each count (every row's sums stay in registers).
template <typename Block>
inline void in_row_blocks(int64_t B, const Block& block) {
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    switch (std::min<int64_t>(4, B - b0)) {
      case 1: block(b0, std::integral_constant<int, 1>()); break;
      case 2: block(b0, std::integral_constant<int, 2>()); break;
      case 3: block(b0, std::integral_constant<int, 3>()); break;
      default: block(b0, std::integral_constant<int, 4>()); break;
    }
  }
}

// The 4-bit kernels' two choices: kernel(wide, scale) with wide a std::bool_constant (spans of 64 inputs, else 32)
// and scale a value of the scales' type (BFloat16 or float).
template <typename Kernel>
inline void with_int4_layout(int64_t span, bool bf16_scales, const Kernel& kernel) {
  if (span == 64) {
    bf16_scales ? kernel(std::true_type(), BFloat16()) : kernel(std::true_type(), float());
  } else {
    bf16_scales ? kernel(std::false_type(), BFloat16()) : kernel(std::false_type(), float());
  }
}

// The rows [b0, b0 + count) of 4-bit activations.
inline GroupActivationsView rows_from(const GroupActivationsView& x, int64_t b0, int64_t K, int64_t groups) {
  return {x.values + b0 * K, x.scale + b0 * groups, x.group_sums + b0 * groups};
}

void avx2_bf16_rows(const float* x, int64_t B, int64_t K, const BFloat16* w, int64_t row, int64_t rows, float* y,
                    int64_t N);
void avx2_int8_rows(const int16_t* x, const float* x_scale, int64_t B, const PackedWeight& weight, int64_t row,
                    int64_t rows, float* y, int64_t N);
void avx2_int4_rows(const GroupActivationsView& x, int64_t span, int64_t B, const PackedWeight& weight, int64_t row,
                    int64_t rows, float* y, int64_t N);
// Whether this build has the AVX-512 kernels and this CPU runs them.
bool avx512_kernels_run_here();
void avx512_bf16_rows(const BFloat16* x, int64_t B, int64_t K, const BFloat16* w, int64_t row, int64_t rows, float* y,
                      int64_t N);
void avx512_int8_rows(const int16_t* x, const float* x_scale, int64_t B, const PackedWeight& weight, int64_t row,
                      int64_t rows, float* y, int64_t N);
void avx512_int4_rows(const GroupActivationsView& x, int64_t span, int64_t B, const PackedWeight& weight, int64_t row,
                      int64_t rows, float* y, int64_t N);

}  // namespace vlmkit
