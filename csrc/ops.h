// Torch-side declarations shared by ops.cpp (schema, checks, CPU) and the CUDA kernels:
// validated, resolved arguments so every backend checks inputs once with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>
#include <string_view>

#include "fopru.h"

namespace fopru {

struct SigArgs {
  int64_t B, H, Q, S, P, N;
  Score score;
};

struct SelectArgs {
  int64_t B, N, keep, rows, cols;
  Strategy strategy;
};

struct PruneArgs {
  SigArgs sig;
  SelectArgs sel;
  int64_t D;
};

// Each raises c10::ValueError (Python ValueError) with the text of fopru_kernels/_checks.py.
SigArgs check_significance(const at::Tensor& attn, std::string_view score, int64_t num_prefix);
SelectArgs check_select(const at::Tensor& sig, int64_t keep, std::string_view strategy,
                        at::OptionalIntArrayRef grid);
PruneArgs check_prune(const at::Tensor& tokens, const at::Tensor& attn, int64_t keep,
                      std::string_view strategy, std::string_view score, int64_t num_prefix,
                      at::OptionalIntArrayRef grid);

// CPU kernels (cpu/prune_tokens.cpp); the schema's C++ signatures.
at::Tensor significance_cpu(const at::Tensor& attn, c10::string_view score, int64_t num_prefix);
at::Tensor select_cpu(const at::Tensor& sig, int64_t keep, c10::string_view strategy,
                      at::OptionalIntArrayRef grid);
std::tuple<at::Tensor, at::Tensor> prune_tokens_cpu(const at::Tensor& tokens, const at::Tensor& attn,
                                                    int64_t keep, c10::string_view strategy,
                                                    c10::string_view score, int64_t num_prefix,
                                                    at::OptionalIntArrayRef grid);

}  // namespace fopru
