// Cephes' e^x for floats, as the vector kernels evaluate it (exp8 in decode_step.cpp, 8 lanes AVX2;
// exp16_nonpositive in attention_avx512.cpp, 16 lanes AVX-512): e^x = 2^n e^r with n = round(x / ln 2),
// r = x - n ln 2 (ln 2 in two parts, so r keeps its low bits), e^r ~ 1 + r + r^2 P(r); within 2 ulp of
// std::exp. One table, so both widths compute the same values.
#pragma once

namespace vlmkit {
namespace exp_polynomial {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;  // kLn2High + kLn2Low ~ ln 2
// P(r), highest power first (Horner's order)
constexpr float kCoefficients[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                   4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

}  // namespace exp_polynomial
}  // namespace vlmkit
