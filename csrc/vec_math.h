// Elementary functions written so that GCC/Clang vectorise the loops that call them.
//
// libm's expf/logf are opaque calls, so a loop over a row of M pair terms that calls them
// runs one lane at a time. The float versions below are the classic Cephes range reduction
// plus minimax polynomial (≈1 ulp on the ranges used here), in straight-line code with no
// branches or calls, so `#pragma omp simd` loops turn them into AVX2/AVX-512 instructions.
// float64 keeps libm: its loops are not the performance path and must be exact to 1e-10.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace fastalpha {
namespace vecmath {

// Bit casts through __builtin_bit_cast: a memcpy into a local keeps GCC from vectorising.
inline float bits_to_float(int32_t bits) { return __builtin_bit_cast(float, bits); }

inline int32_t float_to_bits(float x) { return __builtin_bit_cast(int32_t, x); }

// e^x = 2^n e^r with n = round(x / ln 2), |r| ≤ ln 2 / 2; e^r by a degree-7 polynomial.
// Exactly 0 below the normal range (so masked entries at −inf vanish), +inf above it.
inline float exp_f32(float x) {
  const float lo = -87.33654f, hi = 88.72283f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  // n = round(x / ln 2) by the 1.5·2^23 trick: floor/round do not vectorise under GCC's
  // default -ftrapping-math.
  const float shifter = 12582912.0f;
  float n = (xc * 1.44269504088896341f + shifter) - shifter;
  // ln 2 split in a short high part and a correction, so r = x − n ln 2 is exact enough.
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  float out = y * scale;
  out = x < lo ? 0.0f : out;
  return x != x ? x : out;  // NaN propagates
}

// log x = e ln 2 + log m with x = m 2^e, m ∈ [√½, √2); log m by a degree-9 polynomial.
// log 0 = −inf; x is a non-negative float (subnormals are treated as tiny normals).
inline float log_f32(float x) {
  const int32_t bits = float_to_bits(x);
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 126);   // x = m 2^e, m ∈ [½, 1)
  const float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);
  // Fold m into [√½, √2): where m < √½ use 2m and e − 1 (selects, not branches).
  const float small = m < 0.707106781186547524f ? 1.0f : 0.0f;
  const float fe = e - small;
  const float f = m + small * m - 1.0f;
  const float f2 = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * f2;
  y = y - fe * 2.12194440e-4f;
  y = y - 0.5f * f2;
  float out = f + y + fe * 0.693359375f;
  out = x == 0.0f ? -std::numeric_limits<float>::infinity() : out;
  return x != x ? x : out;
}

// x^k for x ≥ 0 and k ≠ 0, as e^{k log x} (0^k = 0 for k > 0, +inf for k < 0).
inline float pow_f32(float x, float k) { return exp_f32(k * log_f32(x)); }

// The functions the kernel calls, by compute type.
template <typename T>
struct Math;

template <>
struct Math<float> {
  static float exp(float x) { return exp_f32(x); }
  static float log(float x) { return log_f32(x); }
  static float pow(float x, float k) { return pow_f32(x, k); }
  static float sqrt(float x) { return std::sqrt(x); }
};

template <>
struct Math<double> {
  static double exp(double x) { return std::exp(x); }
  static double log(double x) { return std::log(x); }
  static double pow(double x, double k) { return std::pow(x, k); }
  static double sqrt(double x) { return std::sqrt(x); }
};

}  // namespace vecmath
}  // namespace fastalpha
