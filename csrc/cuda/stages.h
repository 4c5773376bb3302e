// Stages of the CUDA prune_tokens path (cuda/prune_tokens.cu) that the other CUDA ops reuse:
// whatever produces int64 significance sums (the map reduction, the q/k kernels) hands them here.
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

}  // namespace fopru
