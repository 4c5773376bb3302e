// Stages of the CUDA prune paths (cuda/prune_tokens.cu, cuda/prune_tokens_varlen.cu) that the other
// CUDA ops reuse: whatever produces int64 significance sums (the map reduction, the q/k kernels, the
// packed q/k kernels) hands them here.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "ops.h"

namespace fopru {

// sig (B, N) int64 from column sums `col` and, for focal, row sums `row` (both (B, N) int64 with unit
// stride along N and the same image stride): col itself when `row` is undefined, else SPEC.md's
// focal choice per image.
at::Tensor choose_significance_cuda(const at::Tensor& col, const at::Tensor& row);

// Selection + gather from the same sums (focal choice first when `row` is defined):
// tokens (B, N, D) -> pruned (B, keep, D), idx (B, keep). `sel` comes from the op's checks.
std::tuple<at::Tensor, at::Tensor> select_gather_cuda(const at::Tensor& tokens, const at::Tensor& col,
                                                      const at::Tensor& row, const SelectArgs& sel);

// The ragged-batch selection + gather of cuda/prune_tokens_varlen.cu on checked arguments `a` (and
// the op's grids): sig (T,) int64 (any stride) of tokens (T, D), image b = tokens [cu_seqlens[b] / divisor,
// cu_seqlens[b + 1] / divisor), each image checked on the device; every image counts as invalid (idx -1,
// zero rows) while the device int64 *invalid is non-zero (invalid may be null) -> (pruned, idx,
// cu_seqlens_out of cu_seqlens' dtype). No host sync: sizes come from `a`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_segments_cuda(const at::Tensor& tokens, const at::Tensor& sig,
                                                                   const at::Tensor& cu_seqlens, int64_t divisor,
                                                                   at::OptionalIntArrayRef grids, const int64_t* invalid,
                                                                   const VarlenArgs& a);

}  // namespace fopru
