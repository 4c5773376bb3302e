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

// ---------------------------------------------------------------------------------------------
// SPEC.md's focal rule in exact integers: the column sums win iff
//   N * sum(col^2) - sum(col)^2 > N * sum(row^2) - sum(row)^2   (N^2 times each variance; ties: row).
// Exact for any int64 vectors of any length n < 2^64, whatever order their sums were taken in:
// sum(x^2) < n 2^126 (190 bits: a 128-bit word and a carry count), |sum(x)| < n 2^63 < 2^127, and
// each side of the comparison, rearranged to N * sum(a^2) + sum(b)^2 with no subtraction, is below
// n^2 2^127 < 2^256 (four 64-bit words).
// ---------------------------------------------------------------------------------------------

using u128 = unsigned __int128;
using i128 = __int128;

// sum(x^2) and sum(x) of one vector (or of part of it: partial sums merge in any order). Start
// from FocalSums{} (zero); no default member initialisers, so CUDA shared memory may hold it.
struct FocalSums {
  u128 sq;         // sum(x^2) mod 2^128
  uint64_t sq_hi;  // sum(x^2) >> 128
  i128 sum;        // sum(x)

  FOPRU_HD void add(int64_t x) {
    const u128 s = static_cast<u128>(static_cast<i128>(x) * x);  // |x^2| <= 2^126
    sq += s;
    sq_hi += sq < s ? 1 : 0;
    sum += x;
  }
  FOPRU_HD void merge(const FocalSums& o) {
    sq += o.sq;
    sq_hi += o.sq_hi + (sq < o.sq ? 1 : 0);
    sum += o.sum;
  }
};

// w += v * 2^(64 k) in 256-bit words w[0..4) (little-endian).
FOPRU_HD void add_words(uint64_t (&w)[4], int k, u128 v) {
  for (int i = k; i < 4 && v != 0; ++i) {
    const u128 t = static_cast<u128>(w[i]) + static_cast<uint64_t>(v);
    w[i] = static_cast<uint64_t>(t);
    v = (v >> 64) + (t >> 64);
  }
}

// w = n * sum(a^2) + sum(b)^2: one side of the focal comparison (a = one vector, b = the other).
FOPRU_HD void focal_side(const FocalSums& a, const FocalSums& b, uint64_t n, uint64_t (&w)[4]) {
  w[0] = w[1] = w[2] = w[3] = 0;
  add_words(w, 0, static_cast<u128>(n) * static_cast<uint64_t>(a.sq));
  add_words(w, 1, static_cast<u128>(n) * static_cast<uint64_t>(a.sq >> 64));
  add_words(w, 2, static_cast<u128>(n) * a.sq_hi);
  const u128 m = b.sum < 0 ? -static_cast<u128>(b.sum) : static_cast<u128>(b.sum);  // |sum(b)|
  const uint64_t lo = static_cast<uint64_t>(m), hi = static_cast<uint64_t>(m >> 64);
  add_words(w, 0, static_cast<u128>(lo) * lo);
  add_words(w, 1, static_cast<u128>(lo) * hi);
  add_words(w, 1, static_cast<u128>(lo) * hi);
  add_words(w, 2, static_cast<u128>(hi) * hi);
}

// FoPru's "larger variance wins" on n-long column and row sums: true for col, false (ties too) for row.
FOPRU_HD bool focal_use_col(const FocalSums& col, const FocalSums& row, int64_t n) {
  uint64_t c[4], r[4];
  focal_side(col, row, static_cast<uint64_t>(n), c);  // N sum(col^2) + sum(row)^2
  focal_side(row, col, static_cast<uint64_t>(n), r);  // N sum(row^2) + sum(col)^2
  for (int i = 3; i >= 0; --i) {
    if (c[i] != r[i]) return c[i] > r[i];
  }
  return false;
}

enum class Score : int { kFocal = 0, kReceived = 1, kCls = 2 };
enum class Strategy : int { kRank = 0, kRow = 1 };

}  // namespace fopru
