// The per-(image, head) work of the q/k CPU kernels (qk_head.h), shared by the dense and the packed
// ops. q and k of the head are widened to float32 once into contiguous buffers (k transposed,
// (d, S), so a block of logits is a loop over contiguous keys), then
//   cls               logits of query 0 over all S keys, [its lse], fx of each patch value;
//   received / focal, logit
//                     qbar / kbar (means of the patch queries / keys, summed in float64), then
//                     colmean_j = scale * qbar . k_j and rowmean_i = scale * q_i . kbar: O(S d);
//   received / focal, prob
//                     blocks of kRows patch queries at a time: their logits over all S keys in a
//                     (kRows, S) buffer, lse per row (given, or max then sum of exp), p = exp(l - lse),
//                     column sums over patch queries and row sums over patch keys in float64.
#include "qk_head.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../fopru.h"

namespace fopru::cpu {
namespace {

// The float hot loops are multiversioned: AVX-512 and AVX2 machines get FMA and wide vectors,
// the default clone runs everywhere. A process always runs the same clone, so results stay fixed.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FOPRU_QK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FOPRU_QK_CLONES
#endif

constexpr int kRows = 4;    // queries per block of logits: each key load feeds kRows FMAs
constexpr int kLanes = 16;  // keys per step: one AVX-512 vector (two AVX2) per query row
constexpr float kLog2eF = 1.44269504088896341f;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// out[r * width + j] = scale * (u_r . column j of xt) for r < kRows, j < width: u is (kRows, d)
// row-major, xt (d, width) with width a multiple of kLanes. Each dot is summed in order of e.
// The lanes are a GCC vector (split into the machine's widths by each clone): with a plain array
// GCC vectorises across rows instead and spends the loop shuffling.
FOPRU_QK_CLONES void dots_block(const float* __restrict u, const float* __restrict xt, int64_t d, int64_t width,
                                float scale, float* __restrict out) {
  using Lanes = float __attribute__((vector_size(kLanes * sizeof(float))));
  for (int64_t j0 = 0; j0 < width; j0 += kLanes) {
    Lanes acc[kRows] = {};
    for (int64_t e = 0; e < d; ++e) {
      Lanes x;
      std::memcpy(&x, xt + e * width + j0, sizeof(Lanes));
      for (int r = 0; r < kRows; ++r) acc[r] += u[r * d + e] * x;
    }
    for (int r = 0; r < kRows; ++r) {
      const Lanes o = scale * acc[r];
      std::memcpy(out + r * width + j0, &o, sizeof(Lanes));
    }
  }
}

// exp(x) in float32 without a library call, so the loops around it vectorise: Cephes expf's
// range reduction and polynomial (relative error ~2^-23, within the tests' 32-ulp allowance).
// Values below 2^-125 are flushed to zero, far under fx's resolution 2^-28; NaN stays NaN.
inline float exp_f32(float x) {
  float c = x < -87.0f ? -87.0f : x;
  c = c > 88.0f ? 88.0f : c;
  // Round to nearest by the 1.5 * 2^23 trick: no rounding-mode call, and it vectorises.
  const float n = (c * kLog2eF + 12582912.0f) - 12582912.0f;
  const float r = (c - n * 0.693359375f) - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  y *= two_n;
  y = x < -87.0f ? 0.0f : y;
  return x != x ? x : y;
}

// Natural-log logsumexp of l[0..n): max, then the sum of exp(l - max) in float64. Lanes keep the
// loops vectorised; their order is fixed.
FOPRU_QK_CLONES float lse_row(const float* __restrict l, int64_t n) {
  float mx[kLanes];
  std::fill(mx, mx + kLanes, -INFINITY);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int t = 0; t < kLanes; ++t) mx[t] = l[j + t] > mx[t] ? l[j + t] : mx[t];
  }
  float m = -INFINITY;
  for (int t = 0; t < kLanes; ++t) m = mx[t] > m ? mx[t] : m;
  for (; j < n; ++j) m = l[j] > m ? l[j] : m;
  if (std::isinf(m)) return m;  // torch.logsumexp's value, and no inf - inf below
  double acc[kLanes] = {};
  j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int t = 0; t < kLanes; ++t) acc[t] += static_cast<double>(exp_f32(l[j + t] - m));
  }
  double s = 0.0;
  for (int t = 0; t < kLanes; ++t) s += acc[t];
  for (; j < n; ++j) s += static_cast<double>(exp_f32(l[j] - m));
  return static_cast<float>(static_cast<double>(m) + std::log(s));
}

// p_j = exp(l[j] - lse) for j < n: col[j] += p_j (float64), returns sum_j p_j (float64, lanes).
FOPRU_QK_CLONES double prob_row(const float* __restrict l, int64_t n, float lse, double* __restrict col,
                                float* __restrict p) {
  for (int64_t j = 0; j < n; ++j) p[j] = exp_f32(l[j] - lse);
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int t = 0; t < kLanes; ++t) {
      const double v = p[j + t];
      col[j + t] += v;
      acc[t] += v;
    }
  }
  double s = 0.0;
  for (int t = 0; t < kLanes; ++t) s += acc[t];
  for (; j < n; ++j) {
    col[j] += p[j];
    s += p[j];
  }
  return s;
}

// out (d, width) = rows [0, S) of x transposed, columns >= S zero.
template <typename T>
void load_t(const Slice<T>& x, int64_t S, int64_t d, int64_t width, float* out) {
  for (int64_t e = 0; e < d; ++e) std::fill(out + e * width + S, out + (e + 1) * width, 0.0f);
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t e = 0; e < d; ++e) out[e * width + s] = x.at(s, e);
  }
}

// out (rows, d) = rows [s0, s0 + n) of x, rows >= n zero.
template <typename T>
void load_rows(const Slice<T>& x, int64_t s0, int64_t n, int64_t rows, int64_t d, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t e = 0; e < d; ++e) out[i * d + e] = x.at(s0 + i, e);
  }
  std::fill(out + n * d, out + rows * d, 0.0f);
}

// u[0, :] = mean of columns [P, S) of xt (d, width), summed in float64; rows 1 .. kRows - 1 zero.
void patch_mean(const float* xt, int64_t width, const HeadMap& m, float* u) {
  std::fill(u, u + kRows * m.d, 0.0f);
  for (int64_t e = 0; e < m.d; ++e) {
    double s = 0.0;
    for (int64_t j = m.P; j < m.S; ++j) s += xt[e * width + j];
    u[e] = static_cast<float>(s / static_cast<double>(m.S - m.P));
  }
}

}  // namespace

template <typename T>
void head_values(const Slice<T>& qs, const Slice<T>& ks, const HeadMap& m, HeadScratch& w, int64_t* col_fx,
                 int64_t* row_fx) {
  const int64_t d = m.d, S = m.S, P = m.P, N = m.S - m.P;
  const int64_t width = round_up(S, kLanes);
  const float scale = m.scale;
  const float* given = m.lse;
  w.kt.resize(d * width);
  w.logits.resize(kRows * width);
  load_t(ks, S, d, width, w.kt.data());
  float* l = w.logits.data();

  if (m.cls) {
    w.u.resize(kRows * d);
    load_rows(qs, 0, 1, kRows, d, w.u.data());
    dots_block(w.u.data(), w.kt.data(), d, width, scale, l);
    const float shift = !m.prob ? 0.0f : given != nullptr ? given[0] : lse_row(l, S);
    for (int64_t j = 0; j < N; ++j) col_fx[j] = fx(m.prob ? exp_f32(l[P + j] - shift) : l[P + j]);
    return;
  }

  if (!m.prob) {  // closed-form means: colmean_j = scale * qbar . k_j, rowmean_i = scale * q_i . kbar
    w.qt.resize(d * width);
    w.u.resize(kRows * d);
    load_t(qs, S, d, width, w.qt.data());
    patch_mean(w.qt.data(), width, m, w.u.data());
    dots_block(w.u.data(), w.kt.data(), d, width, scale, l);
    for (int64_t j = 0; j < N; ++j) col_fx[j] = fx(l[P + j]);
    if (row_fx == nullptr) return;
    patch_mean(w.kt.data(), width, m, w.u.data());
    dots_block(w.u.data(), w.qt.data(), d, width, scale, l);
    for (int64_t i = 0; i < N; ++i) row_fx[i] = fx(l[P + i]);
    return;
  }

  // Probabilities: the patch queries kRows at a time, zero rows padding the last block.
  const int64_t rows = round_up(N, kRows);
  w.qrows.resize(rows * d);
  w.p.resize(N);
  w.col.assign(N, 0.0);
  load_rows(qs, P, N, rows, d, w.qrows.data());
  const double inv_n = 1.0 / static_cast<double>(N);
  for (int64_t i0 = 0; i0 < N; i0 += kRows) {
    dots_block(w.qrows.data() + i0 * d, w.kt.data(), d, width, scale, l);
    for (int64_t r = 0; r < kRows && i0 + r < N; ++r) {
      const int64_t i = i0 + r;
      const float* li = l + r * width;
      const float norm = given != nullptr ? given[(P + i) * m.lse_ss] : lse_row(li, S);
      const double rs = prob_row(li + P, N, norm, w.col.data(), w.p.data());
      if (row_fx != nullptr) row_fx[i] = fx(static_cast<float>(rs * inv_n));
    }
  }
  for (int64_t j = 0; j < N; ++j) col_fx[j] = fx(static_cast<float>(w.col[j] * inv_n));
}

template void head_values<float>(const Slice<float>&, const Slice<float>&, const HeadMap&, HeadScratch&, int64_t*,
                                 int64_t*);
template void head_values<c10::Half>(const Slice<c10::Half>&, const Slice<c10::Half>&, const HeadMap&, HeadScratch&,
                                     int64_t*, int64_t*);
template void head_values<c10::BFloat16>(const Slice<c10::BFloat16>&, const Slice<c10::BFloat16>&, const HeadMap&,
                                         HeadScratch&, int64_t*, int64_t*);

}  // namespace fopru::cpu
