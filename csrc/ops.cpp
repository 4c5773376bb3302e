// The one schema of every fopru op and the registrations that are not a kernel file's own: the CPU
// kernels of the map path (cpu/prune_tokens.cpp) and the Autograd fallthroughs. A process that
// loads this library (Python or C++ via torch::ops / torch.ops.load_library) gets the ops; every
// other kernel file (cpu/*.cpp, cuda/*.cu when built) registers its own ops, and checks.cpp holds
// the input checks they share.
#include <torch/library.h>

#include "ops.h"

// Keep these strings identical to SCHEMAS in fopru_kernels/ops.py (tests/test_ops.py checks it).
TORCH_LIBRARY(fopru, m) {
  m.def("significance(Tensor attn, str score=\"focal\", int num_prefix=1) -> Tensor");
  m.def("select(Tensor sig, int keep, str strategy=\"rank\", int[]? grid=None) -> Tensor");
  m.def(
      "prune_tokens(Tensor tokens, Tensor attn, int keep, str strategy=\"rank\", "
      "str score=\"focal\", int num_prefix=1, int[]? grid=None) -> (Tensor, Tensor)");
  m.def(
      "significance_qk(Tensor q, Tensor k, str score=\"focal\", int num_prefix=1, float? scale=None, "
      "Tensor? lse=None, str kind=\"prob\", str layout=\"bhsd\") -> Tensor");
  m.def(
      "prune_tokens_qk(Tensor tokens, Tensor q, Tensor k, int keep, str strategy=\"rank\", str score=\"focal\", "
      "int num_prefix=1, int[]? grid=None, float? scale=None, Tensor? lse=None, str kind=\"prob\", "
      "str layout=\"bhsd\") -> (Tensor, Tensor)");
  m.def(
      "prune_tokens_varlen(Tensor tokens, Tensor sig, Tensor cu_seqlens, int[] keep, str strategy=\"rank\", "
      "int[]? grids=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "significance_qk_parts(Tensor q, Tensor k, str score=\"focal\", int num_prefix=1, float? scale=None, "
      "Tensor? lse=None, str kind=\"prob\", str layout=\"bhsd\") -> Tensor");
  m.def("significance_from_parts(Tensor parts) -> Tensor");
  // The packed q/k ops: C++ CPU kernels (cpu/significance_qk_varlen.cpp), no CUDA kernel yet
  // (fopru_kernels/ops.py serves CUDA tensors with the float64 reference until it lands).
  m.def(
      "significance_qk_varlen(Tensor q, Tensor k, Tensor cu_seqlens, str score=\"focal\", float? scale=None, "
      "Tensor? lse=None, str kind=\"prob\", int group=1) -> Tensor");
  m.def(
      "prune_tokens_qk_varlen(Tensor tokens, Tensor q, Tensor k, Tensor cu_seqlens, int[] keep, "
      "str strategy=\"rank\", str score=\"focal\", float? scale=None, Tensor? lse=None, str kind=\"prob\", "
      "int group=1, Tensor? cu_seqlens_select=None, int[]? grids=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fopru, CPU, m) {
  m.impl("significance", &fopru::significance_cpu);
  m.impl("select", &fopru::select_cpu);
  m.impl("prune_tokens", &fopru::prune_tokens_cpu);
}

// Inference-only: skipping the Autograd key means outputs never require grad, and no
// "autograd kernel not registered" fallback wraps them.
TORCH_LIBRARY_IMPL(fopru, Autograd, m) {
  m.impl("significance", torch::CppFunction::makeFallthrough());
  m.impl("select", torch::CppFunction::makeFallthrough());
  m.impl("prune_tokens", torch::CppFunction::makeFallthrough());
  m.impl("significance_qk", torch::CppFunction::makeFallthrough());
  m.impl("prune_tokens_qk", torch::CppFunction::makeFallthrough());
  m.impl("prune_tokens_varlen", torch::CppFunction::makeFallthrough());
  m.impl("significance_qk_parts", torch::CppFunction::makeFallthrough());
  m.impl("significance_from_parts", torch::CppFunction::makeFallthrough());
  m.impl("significance_qk_varlen", torch::CppFunction::makeFallthrough());
  m.impl("prune_tokens_qk_varlen", torch::CppFunction::makeFallthrough());
}
