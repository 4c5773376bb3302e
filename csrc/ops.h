// Torch-side declarations shared by ops.cpp (schema, checks, CPU) and the CUDA kernels:
// validated, resolved arguments so every backend checks inputs once with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>
#include <optional>
#include <string_view>
#include <vector>

#include "fopru.h"

namespace fopru {

struct SigArgs {
  int64_t B, H, S, P, N;
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

// significance_qk / prune_tokens_qk (SPEC.md "Significance from q and k"). Element (b, h, s, e) of
// q sits at q + b * q_sb + h * q_sh + s * q_ss + e * q_sd whatever the layout ("bshd" only swaps
// which dimension each stride comes from); k likewise.
struct QkArgs {
  int64_t B, H, S, d, P, N;
  Score score;
  bool prob;     // kind == "prob" (softmax probabilities), else "logit"
  bool has_lse;  // prob only: lse (B, H, S) float32 given
  double scale;  // resolved: d ** -0.5 when None
  int64_t q_sb, q_sh, q_ss, q_sd, k_sb, k_sh, k_ss, k_sd;
};

struct PruneQkArgs {
  QkArgs qk;
  SelectArgs sel;
  int64_t D;
};

// prune_tokens_varlen (SPEC.md "Ragged batches"): the host-side arguments, checked. The values of
// cu_seqlens are checked here only for CPU tensors (values_checked); GPU kernels check per image.
struct VarlenArgs {
  int64_t B, T, D, total;           // total = sum(keep) = rows of the outputs
  Strategy strategy;
  std::vector<int64_t> keep;        // B
  std::vector<int64_t> cols;        // B: cols_b for row, 1 for rank
  std::vector<int64_t> keep_start;  // B + 1: prefix sums of keep (= cu_seqlens_out)
  bool values_checked;
};

// significance_qk_varlen / prune_tokens_qk_varlen (SPEC.md "Packed batches from q and k"): q, k
// (T, H, d); element (t, h, e) of q sits at q + t * q_st + h * q_sh + e * q_sd, k likewise; lse (H, T)
// at lse + h * lse_sh + t * lse_st. cu_seqlens (S + 1,) holds the attention segments; its values were
// checked (values_checked) only for CPU tensors: GPU kernels check them on the device.
struct QkVarlenArgs {
  int64_t T, H, d, S, group;  // group: tokens per merged token; outputs hold T / group scores
  bool received;              // score == "received", else "focal"
  bool prob;                  // kind == "prob", else "logit"
  bool has_lse;
  double scale;               // resolved: d ** -0.5 when None
  int64_t q_st, q_sh, q_sd, k_st, k_sh, k_sd, lse_sh, lse_st;
  bool values_checked;
};

// prune_tokens_qk_varlen: the scoring arguments and the selection segments (cu_seqlens_select, or
// cu_seqlens / group when None; sel.values_checked as above).
struct PruneQkVarlenArgs {
  QkVarlenArgs qk;
  VarlenArgs sel;
};

// Each raises c10::ValueError (Python ValueError) with the text of fopru_kernels/_checks.py.
SigArgs check_significance(const at::Tensor& attn, std::string_view score, int64_t num_prefix);
SelectArgs check_select(const at::Tensor& sig, int64_t keep, std::string_view strategy,
                        at::OptionalIntArrayRef grid);
PruneArgs check_prune(const at::Tensor& tokens, const at::Tensor& attn, int64_t keep,
                      std::string_view strategy, std::string_view score, int64_t num_prefix,
                      at::OptionalIntArrayRef grid);
QkArgs check_significance_qk(const at::Tensor& q, const at::Tensor& k, std::string_view score,
                             int64_t num_prefix, std::optional<double> scale,
                             const std::optional<at::Tensor>& lse, std::string_view kind,
                             std::string_view layout);
PruneQkArgs check_prune_qk(const at::Tensor& tokens, const at::Tensor& q, const at::Tensor& k,
                           int64_t keep, std::string_view strategy, std::string_view score,
                           int64_t num_prefix, at::OptionalIntArrayRef grid,
                           std::optional<double> scale, const std::optional<at::Tensor>& lse,
                           std::string_view kind, std::string_view layout);
// significance_from_parts: parts (B, C, N) int64 with C = 2 (focal: column, row sums) or 1.
void check_parts(const at::Tensor& parts);
VarlenArgs check_prune_varlen(const at::Tensor& tokens, const at::Tensor& sig,
                              const at::Tensor& cu_seqlens, at::IntArrayRef keep,
                              std::string_view strategy, at::OptionalIntArrayRef grids);
// The selection segments of a ragged batch of `tokens`: `name` (its cu_seqlens tensor, whose values
// divided by `divisor` are the segment bounds) with the host keep / strategy / grids.
VarlenArgs check_segments(const at::Tensor& tokens, const at::Tensor& cu_seqlens, at::IntArrayRef keep,
                          std::string_view strategy, at::OptionalIntArrayRef grids,
                          std::string_view name = "cu_seqlens", int64_t divisor = 1);
QkVarlenArgs check_significance_qk_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                          std::string_view score, std::optional<double> scale,
                                          const std::optional<at::Tensor>& lse, std::string_view kind,
                                          int64_t group);
PruneQkVarlenArgs check_prune_qk_varlen(const at::Tensor& tokens, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& cu_seqlens, at::IntArrayRef keep,
                                        std::string_view strategy, std::string_view score,
                                        std::optional<double> scale, const std::optional<at::Tensor>& lse,
                                        std::string_view kind, int64_t group,
                                        const std::optional<at::Tensor>& cu_seqlens_select,
                                        at::OptionalIntArrayRef grids);

// CPU kernels (cpu/prune_tokens.cpp); the schema's C++ signatures.
at::Tensor significance_cpu(const at::Tensor& attn, c10::string_view score, int64_t num_prefix);
at::Tensor select_cpu(const at::Tensor& sig, int64_t keep, c10::string_view strategy,
                      at::OptionalIntArrayRef grid);
std::tuple<at::Tensor, at::Tensor> prune_tokens_cpu(const at::Tensor& tokens, const at::Tensor& attn,
                                                    int64_t keep, c10::string_view strategy,
                                                    c10::string_view score, int64_t num_prefix,
                                                    at::OptionalIntArrayRef grid);
// cpu/prune_tokens_varlen.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_tokens_varlen_cpu(
    const at::Tensor& tokens, const at::Tensor& sig, const at::Tensor& cu_seqlens, at::IntArrayRef keep,
    c10::string_view strategy, at::OptionalIntArrayRef grids);

}  // namespace fopru
