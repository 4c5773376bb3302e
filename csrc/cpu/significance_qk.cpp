// CPU kernels of fopru::significance_qk / prune_tokens_qk (SPEC.md "Significance from q and k"),
// registered for the CPU key. The S x S attention map is never materialised.
//
// One task of at::parallel_for per (image, head): q and k are widened to float32 once into
// contiguous buffers (k transposed, (d, S), so a block of logits is a loop over contiguous keys),
// then
//   cls               logits of query 0 over all S keys, [its lse], fx of each patch value;
//   received / focal, logit
//                     qbar / kbar (means of the patch queries / keys, summed in float64), then
//                     colmean_j = scale * qbar . k_j and rowmean_i = scale * q_i . kbar: O(S d);
//   received / focal, prob
//                     blocks of kRows patch queries at a time: their logits over all S keys in a
//                     (kRows, S) buffer, lse per row (given, or max then sum of exp), p = exp(l - lse),
//                     column sums over patch queries and row sums over patch keys in float64.
// fx of each head's values goes to an int64 (B, H, N) buffer, summed over heads afterwards.
//
// Determinism: every float sum runs in an order fixed by (S, d, the clone the CPU picks); none
// depends on B or on the thread count, and the head sums are exact int64 sums.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "select.h"

namespace fopru {
namespace {

using cpu::for_each_image;
using cpu::select_image;

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

// One image-and-head slice of q or k: element (s, e) at p[s * ss + e * sd].
template <typename T>
struct Slice {
  const T* p;
  int64_t ss, sd;
  float at(int64_t s, int64_t e) const { return static_cast<float>(p[s * ss + e * sd]); }
};

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
void patch_mean(const float* xt, int64_t width, const QkArgs& a, float* u) {
  std::fill(u, u + kRows * a.d, 0.0f);
  for (int64_t e = 0; e < a.d; ++e) {
    double s = 0.0;
    for (int64_t j = a.P; j < a.S; ++j) s += xt[e * width + j];
    u[e] = static_cast<float>(s / static_cast<double>(a.N));
  }
}

// Per-task buffers, allocated once per chunk of (image, head) pairs.
struct Scratch {
  std::vector<float> kt, qt, qrows, u, logits, p;
  std::vector<double> col;
};

// fx of one (image, head)'s values: col_fx[j] (cls values or column means), row_fx[i] (focal).
template <typename T>
void head_values(const T* q, const T* k, const std::optional<at::Tensor>& lse, const QkArgs& a, int64_t b,
                 int64_t h, Scratch& w, int64_t* col_fx, int64_t* row_fx) {
  const Slice<T> qs{q + b * a.q_sb + h * a.q_sh, a.q_ss, a.q_sd};
  const Slice<T> ks{k + b * a.k_sb + h * a.k_sh, a.k_ss, a.k_sd};
  const int64_t d = a.d, S = a.S, P = a.P, N = a.N;
  const int64_t width = round_up(S, kLanes);
  const float scale = static_cast<float>(a.scale);
  const float* given = a.has_lse ? lse->const_data_ptr<float>() + b * lse->stride(0) + h * lse->stride(1) : nullptr;
  const int64_t lse_ss = a.has_lse ? lse->stride(2) : 0;
  w.kt.resize(d * width);
  w.logits.resize(kRows * width);
  load_t(ks, S, d, width, w.kt.data());
  float* l = w.logits.data();

  if (a.score == Score::kCls) {
    w.u.resize(kRows * d);
    load_rows(qs, 0, 1, kRows, d, w.u.data());
    dots_block(w.u.data(), w.kt.data(), d, width, scale, l);
    const float shift = !a.prob ? 0.0f : given != nullptr ? given[0] : lse_row(l, S);
    for (int64_t j = 0; j < N; ++j) col_fx[j] = fx(a.prob ? exp_f32(l[P + j] - shift) : l[P + j]);
    return;
  }

  if (!a.prob) {  // closed-form means: colmean_j = scale * qbar . k_j, rowmean_i = scale * q_i . kbar
    w.qt.resize(d * width);
    w.u.resize(kRows * d);
    load_t(qs, S, d, width, w.qt.data());
    patch_mean(w.qt.data(), width, a, w.u.data());
    dots_block(w.u.data(), w.kt.data(), d, width, scale, l);
    for (int64_t j = 0; j < N; ++j) col_fx[j] = fx(l[P + j]);
    if (row_fx == nullptr) return;
    patch_mean(w.kt.data(), width, a, w.u.data());
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
      const float norm = given != nullptr ? given[(P + i) * lse_ss] : lse_row(li, S);
      const double rs = prob_row(li + P, N, norm, w.col.data(), w.p.data());
      if (row_fx != nullptr) row_fx[i] = fx(static_cast<float>(rs * inv_n));
    }
  }
  for (int64_t j = 0; j < N; ++j) col_fx[j] = fx(static_cast<float>(w.col[j] * inv_n));
}

// sums (B, N or 2N) int64: column (or cls) sums in [:, :N], focal row sums in [:, N:].
void compute_sums(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse, const QkArgs& a,
                  int64_t* sums) {
  const bool focal = a.score == Score::kFocal;
  const int64_t width = focal ? 2 * a.N : a.N;
  // Per-head fx values (B, H, 2, N), summed over heads below: exact, so any order would do.
  std::vector<int64_t> heads(a.B * a.H * 2 * a.N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fopru_significance_qk", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    at::parallel_for(0, a.B * a.H, 1, [&](int64_t begin, int64_t end) {
      Scratch w;
      for (int64_t t = begin; t < end; ++t) {
        int64_t* out = heads.data() + t * 2 * a.N;
        head_values<scalar_t>(qp, kp, lse, a, t / a.H, t % a.H, w, out, focal ? out + a.N : nullptr);
      }
    });
  });
  for_each_image(a.B, [&](int64_t b) {
    int64_t* s = sums + b * width;
    std::fill(s, s + width, 0);
    for (int64_t h = 0; h < a.H; ++h) {
      const int64_t* v = heads.data() + (b * a.H + h) * 2 * a.N;
      for (int64_t j = 0; j < width; ++j) s[j] += v[j];
    }
  });
}

// sig[0..N) = col or row of one image by the exact focal rule.
void choose_focal(const int64_t* col, const int64_t* row, int64_t n, int64_t* sig) {
  const int64_t* src = cpu::focal_prefers_col(col, row, n) ? col : row;
  std::copy(src, src + n, sig);
}

// The image's significance: its column sums, or for focal the chosen half of its (col, row) sums.
const int64_t* image_sig(const int64_t* sums, const QkArgs& a, int64_t b, int64_t* buf) {
  if (a.score != Score::kFocal) return sums + b * a.N;
  const int64_t* s = sums + b * 2 * a.N;
  choose_focal(s, s + a.N, a.N, buf);
  return buf;
}

std::vector<int64_t> all_sums(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse,
                              const QkArgs& a) {
  std::vector<int64_t> sums(a.B * (a.score == Score::kFocal ? 2 : 1) * a.N);
  compute_sums(q, k, lse, a, sums.data());
  return sums;
}

}  // namespace

at::Tensor significance_qk_cpu(const at::Tensor& q, const at::Tensor& k, c10::string_view score, int64_t num_prefix,
                               std::optional<double> scale, const std::optional<at::Tensor>& lse,
                               c10::string_view kind, c10::string_view layout) {
  const QkArgs a = check_significance_qk(q, k, std::string_view(score.data(), score.size()), num_prefix, scale, lse,
                                         std::string_view(kind.data(), kind.size()),
                                         std::string_view(layout.data(), layout.size()));
  at::Tensor sig = at::empty({a.B, a.N}, q.options().dtype(at::kLong));
  if (a.B == 0) return sig;
  int64_t* out = sig.data_ptr<int64_t>();
  if (a.score != Score::kFocal) {
    compute_sums(q, k, lse, a, out);
    return sig;
  }
  const std::vector<int64_t> sums = all_sums(q, k, lse, a);
  for_each_image(a.B, [&](int64_t b) { image_sig(sums.data(), a, b, out + b * a.N); });
  return sig;
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_qk_cpu(const at::Tensor& tokens, const at::Tensor& q,
                                                       const at::Tensor& k, int64_t keep, c10::string_view strategy,
                                                       c10::string_view score, int64_t num_prefix,
                                                       at::OptionalIntArrayRef grid, std::optional<double> scale,
                                                       const std::optional<at::Tensor>& lse, c10::string_view kind,
                                                       c10::string_view layout) {
  const PruneQkArgs p = check_prune_qk(tokens, q, k, keep, std::string_view(strategy.data(), strategy.size()),
                                       std::string_view(score.data(), score.size()), num_prefix, grid, scale, lse,
                                       std::string_view(kind.data(), kind.size()),
                                       std::string_view(layout.data(), layout.size()));
  const QkArgs& a = p.qk;
  at::Tensor pruned = at::empty({a.B, p.sel.keep, p.D}, tokens.options());
  at::Tensor idx = at::empty({a.B, p.sel.keep}, tokens.options().dtype(at::kLong));
  if (a.B == 0 || p.sel.keep == 0) return {pruned, idx};
  const std::vector<int64_t> sums = all_sums(q, k, lse, a);
  int64_t* ix = idx.data_ptr<int64_t>();
  char* out = static_cast<char*>(pruned.data_ptr());
  const int64_t es = tokens.element_size();
  const char* base = static_cast<const char*>(tokens.const_data_ptr());
  const int64_t out_bytes = p.sel.keep * p.D * es;
  for_each_image(a.B, [&](int64_t b) {
    std::vector<int64_t> buf(a.N), scratch, order;
    select_image(image_sig(sums.data(), a, b, buf.data()), p.sel, ix + b * p.sel.keep, scratch, order);
    cpu::gather_rows(base + b * tokens.stride(0) * es, tokens.stride(1) * es, tokens.stride(2) * es, es, p.D,
                     ix + b * p.sel.keep, p.sel.keep, out + b * out_bytes);
  });
  return {pruned, idx};
}

// The sums significance_qk chooses from, (B, C, N): compute_sums' (B, C * N) layout as it is.
at::Tensor significance_qk_parts_cpu(const at::Tensor& q, const at::Tensor& k, c10::string_view score,
                                     int64_t num_prefix, std::optional<double> scale,
                                     const std::optional<at::Tensor>& lse, c10::string_view kind,
                                     c10::string_view layout) {
  const QkArgs a = check_significance_qk(q, k, std::string_view(score.data(), score.size()), num_prefix, scale, lse,
                                         std::string_view(kind.data(), kind.size()),
                                         std::string_view(layout.data(), layout.size()));
  at::Tensor parts = at::empty({a.B, a.score == Score::kFocal ? 2 : 1, a.N}, q.options().dtype(at::kLong));
  if (a.B > 0) compute_sums(q, k, lse, a, parts.data_ptr<int64_t>());
  return parts;
}

at::Tensor significance_from_parts_cpu(const at::Tensor& parts) {
  check_parts(parts);
  const int64_t B = parts.size(0), C = parts.size(1), N = parts.size(2);
  const at::Tensor p = parts.contiguous();
  at::Tensor sig = at::empty({B, N}, parts.options());
  const int64_t* in = p.const_data_ptr<int64_t>();
  int64_t* out = sig.data_ptr<int64_t>();
  for_each_image(B, [&](int64_t b) {
    const int64_t* s = in + b * C * N;
    if (C == 1) {
      std::copy(s, s + N, out + b * N);
    } else {
      choose_focal(s, s + N, N, out + b * N);
    }
  });
  return sig;
}

}  // namespace fopru

TORCH_LIBRARY_IMPL(fopru, CPU, m) {
  m.impl("significance_qk", &fopru::significance_qk_cpu);
  m.impl("prune_tokens_qk", &fopru::prune_tokens_qk_cpu);
  m.impl("significance_qk_parts", &fopru::significance_qk_parts_cpu);
  m.impl("significance_from_parts", &fopru::significance_from_parts_cpu);
}
