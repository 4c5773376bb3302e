// CPU kernels of fopru::significance_qk / prune_tokens_qk (SPEC.md "Significance from q and k"),
// registered for the CPU key. The S x S attention map is never materialised.
//
// One task of at::parallel_for per (image, head), each scored by cpu::head_values (qk_head.cpp,
// shared with the packed ops): fx of each head's values goes to an int64 (B, H, N) buffer, summed
// over heads afterwards.
//
// Determinism: every float sum runs in an order fixed by (S, d, the clone the CPU picks); none
// depends on B or on the thread count, and the head sums are exact int64 sums.
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "qk_head.h"
#include "select.h"

namespace fopru {
namespace {

using cpu::for_each_image;
using cpu::select_image;

// The head map of (image b, head h): a whole image, lse (B, H, S) at any strides.
cpu::HeadMap head_map(const std::optional<at::Tensor>& lse, const QkArgs& a, int64_t b, int64_t h) {
  const float* given = a.has_lse ? lse->const_data_ptr<float>() + b * lse->stride(0) + h * lse->stride(1) : nullptr;
  return cpu::HeadMap{a.S, a.P, a.d, static_cast<float>(a.scale), a.prob, a.score == Score::kCls, given,
                      a.has_lse ? lse->stride(2) : 0};
}

// sums (B, N or 2N) int64: column (or cls) sums in [:, :N], focal row sums in [:, N:].
void compute_sums(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse, const QkArgs& a,
                  int64_t* sums) {
  const bool focal = a.score == Score::kFocal;
  const int64_t width = focal ? 2 * a.N : a.N;
  // Per-head fx values (B, H, 2, N), summed over heads below: exact, so any order would do.
  std::vector<int64_t> heads(a.B * a.H * 2 * a.N);
  AT_DISPATCH_V2(q.scalar_type(), "fopru_significance_qk", AT_WRAP([&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    at::parallel_for(0, a.B * a.H, 1, [&](int64_t begin, int64_t end) {
      cpu::HeadScratch w;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / a.H, h = t % a.H;
        const cpu::Slice<scalar_t> qs{qp + b * a.q_sb + h * a.q_sh, a.q_ss, a.q_sd};
        const cpu::Slice<scalar_t> ks{kp + b * a.k_sb + h * a.k_sh, a.k_ss, a.k_sd};
        int64_t* out = heads.data() + t * 2 * a.N;
        cpu::head_values(qs, ks, head_map(lse, a, b, h), w, out, focal ? out + a.N : nullptr);
      }
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
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
