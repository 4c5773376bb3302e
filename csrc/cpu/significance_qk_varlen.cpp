// CPU kernels of fopru::significance_qk_varlen / prune_tokens_qk_varlen (SPEC.md "Packed batches from
// q and k"), registered for the CPU key. Each attention segment is scored as the dense op scores an
// image with no prefix token: the same cpu::head_values (qk_head.cpp) on the segment's q / k rows and
// lse entries, so a segment's values are the dense kernel's on that segment alone, bit for bit. Then
// the exact focal choice per segment (select.h), the `group` sums, and for the prune the ragged-batch
// selection and gather (prune_segments_cpu, prune_tokens_varlen.cpp) on the selection segments.
//
// Work: one item per (segment, head), claimed from a shared counter in order of decreasing cost
// (prob: n^2 d, logit: n d), so the heads of a 1024-token segment start first and the 4-token ones
// fill the gaps: no thread finishes more than one item's time after the others, whatever the mix of
// segment sizes. Results do not depend on which thread takes an item: each writes its own slice of
// an int64 (H, C, T) buffer, and the head sums are exact int64 sums.
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "qk_head.h"
#include "select.h"

namespace fopru {
namespace {

constexpr int64_t kSumGrain = 1 << 14;  // tokens per task of the head sums: a few microseconds each

// cu_seqlens' values on the host. Only after the check read and validated them (CPU tensors).
std::vector<int64_t> host_bounds(const at::Tensor& cu_seqlens, bool checked) {
  TORCH_INTERNAL_ASSERT(checked, "significance_qk_varlen_cpu: cu_seqlens values were not checked");
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* c = cu.const_data_ptr<int64_t>();
  return std::vector<int64_t>(c, c + cu.numel());
}

struct Item {
  int64_t seg, head, cost;
};

// The (segment, head) pairs of the non-empty segments, most expensive first (ties in order).
std::vector<Item> work_items(const std::vector<int64_t>& bounds, const QkVarlenArgs& a) {
  std::vector<Item> items;
  for (size_t s = 0; s + 1 < bounds.size(); ++s) {
    const int64_t n = bounds[s + 1] - bounds[s];
    if (n == 0) continue;
    for (int64_t h = 0; h < a.H; ++h) items.push_back({static_cast<int64_t>(s), h, a.prob ? n * n : n});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  return items;
}

// parts (C, T) int64: parts[0, t] = col[t] = sum_h fx(colmean[h, t]) over t's segment, and for focal
// (C = 2) parts[1, t] = row[t] = sum_h fx(rowmean[h, t]) (SPEC.md; reference_qk.significance_qk_varlen_parts).
void packed_parts(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse,
                  const QkVarlenArgs& a, const std::vector<int64_t>& bounds, int64_t* parts) {
  const int64_t C = a.received ? 1 : 2, width = C * a.T;
  std::vector<int64_t> heads(a.H * width);  // (H, C, T): each item writes its own rows of its head
  const std::vector<Item> items = work_items(bounds, a);
  const float* lp = a.has_lse ? lse->const_data_ptr<float>() : nullptr;
  AT_DISPATCH_V2(q.scalar_type(), "fopru_significance_qk_varlen", AT_WRAP([&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    std::atomic<size_t> next{0};
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
    // One task per worker; each drains the shared queue, so the range split does not matter (a
    // nested call that runs the whole range on one thread drains it alone).
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      cpu::HeadScratch w;
      for (size_t i = next++; i < items.size(); i = next++) {
        const int64_t t0 = bounds[items[i].seg], n = bounds[items[i].seg + 1] - t0, h = items[i].head;
        const cpu::Slice<scalar_t> qs{qp + t0 * a.q_st + h * a.q_sh, a.q_st, a.q_sd};
        const cpu::Slice<scalar_t> ks{kp + t0 * a.k_st + h * a.k_sh, a.k_st, a.k_sd};
        const float* given = lp != nullptr ? lp + h * a.lse_sh + t0 * a.lse_st : nullptr;
        const cpu::HeadMap m{n, 0, a.d, static_cast<float>(a.scale), a.prob, false, given, a.lse_st};
        int64_t* out = heads.data() + h * width + t0;
        cpu::head_values(qs, ks, m, w, out, C == 2 ? out + a.T : nullptr);
      }
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  at::parallel_for(0, width, kSumGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int64_t s = 0;
      for (int64_t h = 0; h < a.H; ++h) s += heads[h * width + j];
      parts[j] = s;
    }
  });
}

// sig (T / group,) from parts (C, T): per segment its col (received) or the exact focal choice
// between its col and row, then the sums of `group` consecutive tokens (never across segments:
// every n_s is a multiple of group).
void sig_from_parts(const int64_t* parts, int64_t C, int64_t T, const std::vector<int64_t>& bounds, int64_t group,
                    int64_t* sig) {
  cpu::for_each_image(static_cast<int64_t>(bounds.size()) - 1, [&](int64_t s) {
    const int64_t a0 = bounds[s], n = bounds[s + 1] - a0;
    if (n == 0) return;
    const int64_t* src = parts + a0;
    if (C == 2 && !cpu::focal_prefers_col(parts + a0, parts + T + a0, n)) src = parts + T + a0;
    for (int64_t u = 0; u < n / group; ++u) {
      int64_t acc = 0;
      for (int64_t r = 0; r < group; ++r) acc += src[u * group + r];
      sig[a0 / group + u] = acc;
    }
  });
}

void packed_significance(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                         const std::optional<at::Tensor>& lse, const QkVarlenArgs& a, int64_t* sig) {
  if (a.T == 0) return;
  const std::vector<int64_t> bounds = host_bounds(cu_seqlens, a.values_checked);
  const int64_t C = a.received ? 1 : 2;
  std::vector<int64_t> parts(C * a.T);
  packed_parts(q, k, lse, a, bounds, parts.data());
  sig_from_parts(parts.data(), C, a.T, bounds, a.group, sig);
}

std::string_view view(c10::string_view s) { return std::string_view(s.data(), s.size()); }

}  // namespace

at::Tensor significance_qk_varlen_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                      c10::string_view score, std::optional<double> scale,
                                      const std::optional<at::Tensor>& lse, c10::string_view kind, int64_t group) {
  const QkVarlenArgs a = check_significance_qk_varlen(q, k, cu_seqlens, view(score), scale, lse, view(kind), group);
  at::Tensor sig = at::empty({a.T / a.group}, q.options().dtype(at::kLong));
  packed_significance(q, k, cu_seqlens, lse, a, sig.data_ptr<int64_t>());
  return sig;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_tokens_qk_varlen_cpu(
    const at::Tensor& tokens, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
    at::IntArrayRef keep, c10::string_view strategy, c10::string_view score, std::optional<double> scale,
    const std::optional<at::Tensor>& lse, c10::string_view kind, int64_t group,
    const std::optional<at::Tensor>& cu_seqlens_select, at::OptionalIntArrayRef grids) {
  const PruneQkVarlenArgs p = check_prune_qk_varlen(tokens, q, k, cu_seqlens, keep, view(strategy), view(score), scale,
                                                    lse, view(kind), group, cu_seqlens_select, grids);
  std::vector<int64_t> sig(p.qk.T / p.qk.group);
  if (p.sel.total > 0) packed_significance(q, k, cu_seqlens, lse, p.qk, sig.data());  // nothing kept: nothing read
  // SPEC.md: prune_tokens_varlen on sig over the selection segments (cu_seqlens / group when None).
  return cu_seqlens_select.has_value() ? prune_segments_cpu(tokens, sig.data(), *cu_seqlens_select, 1, p.sel)
                                       : prune_segments_cpu(tokens, sig.data(), cu_seqlens, group, p.sel);
}

}  // namespace fopru

TORCH_LIBRARY_IMPL(fopru, CPU, m) {
  m.impl("significance_qk_varlen", &fopru::significance_qk_varlen_cpu);
  m.impl("prune_tokens_qk_varlen", &fopru::prune_tokens_qk_varlen_cpu);
}
