// Torch-free declarations shared by every kernel: limits, fixed-point conversion, key packing.
// Included by C++ and CUDA sources alike, so everything here is host/device-agnostic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FOPRU_HD __host__ __device__ __forceinline__
#else
#define FOPRU_HD inline
#endif

namespace fopru {

// SPEC.md: every sum has at most H * Q' * W' <= 2^26 terms of |fx| <= 2^36, so it stays below 2^62.
constexpr int64_t kMaxTerms = int64_t{1} << 26;
constexpr float kFxScaleF = 268435456.0f;  // 2^28: exact scaling, so float32 and float64 agree
constexpr double kFxScaleD = 268435456.0;
constexpr float kFxClampF = 256.0f;
constexpr double kFxClampD = 256.0;

// fx(a) = trunc(clamp(a', -256, 256) * 2^28), a' = 0 for NaN. float32 for 16/32-bit inputs
// (callers convert half/bfloat16 to float first, which is exact), float64 for float64 inputs.
// Ternaries rather than fminf/fmaxf so the NaN rule is explicit and host and device agree; three
// independent selects (not nested) so GCC if-converts and vectorises the CPU loops.
FOPRU_HD int64_t fx(float a) {
  a = (a != a) ? 0.0f : a;
  a = a < -kFxClampF ? -kFxClampF : a;
  a = a > kFxClampF ? kFxClampF : a;
  return static_cast<int64_t>(a * kFxScaleF);  // the cast truncates toward zero
}

FOPRU_HD int64_t fx(double a) {
  a = (a != a) ? 0.0 : a;
  a = a < -kFxClampD ? -kFxClampD : a;
  a = a > kFxClampD ? kFxClampD : a;
  return static_cast<int64_t>(a * kFxScaleD);
}

// Selection compares unsigned keys: flipping the sign bit maps int64 order onto uint64 order,
// which radix selection and bitwise binary search need.
FOPRU_HD uint64_t order_key(int64_t v) {
  return static_cast<uint64_t>(v) ^ (uint64_t{1} << 63);
}

// FoPru's "larger variance wins": col only if strictly larger, ties go to row (SPEC.md focal).
FOPRU_HD bool focal_use_col(double var_col, double var_row) { return var_col > var_row; }

enum class Score : int { kFocal = 0, kReceived = 1, kCls = 2 };
enum class Strategy : int { kRank = 0, kRow = 1 };

}  // namespace fopru
