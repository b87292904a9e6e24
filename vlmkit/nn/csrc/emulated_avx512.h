// The AVX-512 F/BW/VL/BF16/VNNI intrinsics the kernels use, emulated with SIMDe's portable ones (and, for the
// few SIMDe lacks, lane-by-lane definitions here): only for building the AVX-512 kernels on a CPU without
// them, to check their arithmetic (VLMKIT_CPU_KERNELS=avx512-emulated); far slower than the real ones.
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <array>
#include <cstdint>
#include <cstring>

namespace vlmkit::emulated {

template <typename To, typename From>
inline To bits(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

template <typename Vector, typename Lane, int LANES>
inline Vector masked_load(uint64_t mask, const void* p) {
  Lane lanes[LANES];
  for (int i = 0; i < LANES; ++i) {
    lanes[i] = (mask >> i) & 1 ? static_cast<const Lane*>(p)[i] : Lane{0};
  }
  return bits<Vector>(lanes);
}

template <typename Lane, int LANES, typename Vector>
inline void masked_store(void* p, uint64_t mask, const Vector& v) {
  const auto lanes = bits<std::array<Lane, LANES>>(v);
  for (int i = 0; i < LANES; ++i) {
    if ((mask >> i) & 1) static_cast<Lane*>(p)[i] = lanes[i];
  }
}

template <typename To, typename ToLane, typename From, typename FromLane, int LANES>
inline To widen(const From& v) {
  const auto in = bits<std::array<FromLane, LANES>>(v);
  std::array<ToLane, LANES> out;
  for (int i = 0; i < LANES; ++i) out[i] = static_cast<ToLane>(in[i]);
  return bits<To>(out);
}

// fp32 to bf16 as vcvtneps2bf16 rounds: to nearest, ties to even, NaN kept quiet
inline uint16_t bf16_of(float value) {
  const uint32_t u = bits<uint32_t>(value);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

}  // namespace vlmkit::emulated


inline __m512 vlmkit_mm512_cvtepi32_ps(__m512i a) {
  return vlmkit::emulated::widen<__m512, float, __m512i, int32_t, 16>(a);
}
inline __m512i vlmkit_mm512_cvtepu16_epi32(__m256i a) {
  return vlmkit::emulated::widen<__m512i, int32_t, __m256i, uint16_t, 16>(a);
}
inline __m256bh vlmkit_mm512_cvtneps_pbh(__m512 a) {
  const auto lanes = vlmkit::emulated::bits<std::array<float, 16>>(a);
  std::array<uint16_t, 16> out;
  for (int i = 0; i < 16; ++i) out[i] = vlmkit::emulated::bf16_of(lanes[i]);
  return vlmkit::emulated::bits<__m256bh>(out);
}
inline float vlmkit_mm512_reduce_add_ps(__m512 a) {
  // the tree vaddps reductions of compilers' _mm512_reduce_add_ps take: halves, then quarters...
  auto lanes = vlmkit::emulated::bits<std::array<float, 16>>(a);
  for (int width = 8; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}
inline float vlmkit_mm512_reduce_max_ps(__m512 a) {
  auto lanes = vlmkit::emulated::bits<std::array<float, 16>>(a);
  for (int width = 8; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] = lanes[i] > lanes[i + width] ? lanes[i] : lanes[i + width];
  }
  return lanes[0];
}
inline __m512i vlmkit_mm512_zextsi256_si512(__m256i a) {
  std::array<uint8_t, 64> out{};
  std::memcpy(out.data(), &a, 32);
  return vlmkit::emulated::bits<__m512i>(out);
}
#define _mm512_cvtepi32_ps vlmkit_mm512_cvtepi32_ps
#define _mm512_cvtepu16_epi32 vlmkit_mm512_cvtepu16_epi32
#define _mm512_cvtneps_pbh vlmkit_mm512_cvtneps_pbh
#define _mm512_reduce_add_ps vlmkit_mm512_reduce_add_ps
#define _mm512_reduce_max_ps vlmkit_mm512_reduce_max_ps
#define _mm512_zextsi256_si512 vlmkit_mm512_zextsi256_si512
#define _mm512_maskz_loadu_epi16(m, p) (vlmkit::emulated::masked_load<__m512i, uint16_t, 32>((m), (p)))
#define _mm512_maskz_loadu_epi32(m, p) (vlmkit::emulated::masked_load<__m512i, uint32_t, 16>((m), (p)))
#define _mm256_maskz_loadu_epi16(m, p) (vlmkit::emulated::masked_load<__m256i, uint16_t, 16>((m), (p)))
#define _mm256_maskz_loadu_epi8(m, p) (vlmkit::emulated::masked_load<__m256i, uint8_t, 32>((m), (p)))
#define _mm_maskz_loadu_epi8(m, p) (vlmkit::emulated::masked_load<__m128i, uint8_t, 16>((m), (p)))
#define _mm512_mask_storeu_epi32(p, m, v) (vlmkit::emulated::masked_store<uint32_t, 16>((p), (m), (v)))
#define _mm256_mask_storeu_epi16(p, m, v) (vlmkit::emulated::masked_store<uint16_t, 16>((p), (m), (v)))
