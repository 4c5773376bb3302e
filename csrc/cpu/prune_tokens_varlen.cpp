// CPU kernel of prune_tokens_varlen (SPEC.md "Ragged batches"): selection and gather of B packed
// images of different sizes, one image per task of at::parallel_for. The selection and the row
// copy are the dense op's (select.h), so every image's result is select() of its own segment.
// prune_tokens_qk_varlen (significance_qk_varlen.cpp) runs the same selection and gather on the
// significance it computes, through prune_segments_cpu.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "select.h"

namespace fopru {

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_segments_cpu(const at::Tensor& tokens, const int64_t* sig,
                                                                  const at::Tensor& cu_seqlens, int64_t divisor,
                                                                  const VarlenArgs& a) {
  // The segment bounds are read below: the check must have validated their values (it does for
  // every CPU tensor), or a bad cu_seqlens would index out of bounds.
  TORCH_INTERNAL_ASSERT(a.values_checked, "prune_segments_cpu: cu_seqlens values were not checked");
  at::Tensor pruned = at::empty({a.total, a.D}, tokens.options());
  at::Tensor idx = at::empty({a.total}, tokens.options().dtype(at::kLong));
  at::Tensor cu_out = at::empty({a.B + 1}, cu_seqlens.options());
  AT_DISPATCH_INDEX_TYPES(cu_seqlens.scalar_type(), "fopru_cu_seqlens_out", [&] {
    auto* out = cu_out.data_ptr<index_t>();
    for (int64_t b = 0; b <= a.B; ++b) out[b] = static_cast<index_t>(a.keep_start[b]);
  });
  if (a.total == 0) return {pruned, idx, cu_out};

  // Small next to tokens (8 bytes a segment): one contiguous int64 copy keeps the selection on
  // plain pointers, as in the dense kernel.
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  std::vector<int64_t> bounds(cu.const_data_ptr<int64_t>(), cu.const_data_ptr<int64_t>() + a.B + 1);
  for (int64_t& v : bounds) v /= divisor;  // checked: non-negative, each a multiple of divisor
  int64_t* ix = idx.data_ptr<int64_t>();
  const int64_t es = tokens.element_size();
  const char* base = static_cast<const char*>(tokens.const_data_ptr());
  char* out = static_cast<char*>(pruned.data_ptr());
  cpu::for_each_image(a.B, [&](int64_t b) {
    const int64_t start = bounds[b], n = bounds[b + 1] - start, k = a.keep[b], w = a.cols[b];
    if (k == 0) return;
    const SelectArgs sel{1, n, k, n / w, w, a.strategy};
    int64_t* image_idx = ix + a.keep_start[b];
    std::vector<int64_t> scratch, order;
    cpu::select_image(sig + start, sel, image_idx, scratch, order);
    for (int64_t j = 0; j < k; ++j) image_idx[j] += start;  // segment-local -> global token index
    cpu::gather_rows(base, tokens.stride(0) * es, tokens.stride(1) * es, es, a.D, image_idx, k,
                     out + a.keep_start[b] * a.D * es);
  });
  return {pruned, idx, cu_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_tokens_varlen_cpu(
    const at::Tensor& tokens, const at::Tensor& sig, const at::Tensor& cu_seqlens, at::IntArrayRef keep,
    c10::string_view strategy, at::OptionalIntArrayRef grids) {
  const VarlenArgs a = check_prune_varlen(tokens, sig, cu_seqlens, keep, strategy, grids);
  const at::Tensor s = sig.contiguous();  // 8 bytes a token, small next to tokens
  return prune_segments_cpu(tokens, s.const_data_ptr<int64_t>(), cu_seqlens, 1, a);
}

}  // namespace fopru

TORCH_LIBRARY_IMPL(fopru, CPU, m) { m.impl("prune_tokens_varlen", &fopru::prune_tokens_varlen_cpu); }
