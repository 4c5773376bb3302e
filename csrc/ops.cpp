// The one schema of every fopru op, the input checks every backend shares, and the CPU registration.
// A process that loads this library (Python or C++ via torch::ops / torch.ops.load_library) gets
// the ops; the CUDA kernels register themselves from cuda/prune_tokens.cu when built.
#include "ops.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>

namespace fopru {
namespace {

// Same text as fopru_kernels/_checks.py; TORCH_CHECK_VALUE raises ValueError in Python.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  TORCH_CHECK_VALUE(false, os.str());
}

// torch's Python spelling of a dtype ("float16"), so C++ and Python messages read the same.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

std::string device_name(const at::Device& d) { return d.str(); }

std::pair<int64_t, int64_t> resolve_grid(int64_t n, at::OptionalIntArrayRef grid, bool required) {
  if (!grid.has_value()) {
    auto r = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
    while (r * r > n) --r;
    while ((r + 1) * (r + 1) <= n) ++r;
    if (r * r == n) return {r, r};
    if (required) {
      fail("grid=None means a square grid, but N = ", n,
           " is not a perfect square: pass grid=(rows, cols)");
    }
    return {1, n};
  }
  auto g = *grid;
  if (g.size() != 2 || g[0] <= 0 || g[1] <= 0 || g[0] * g[1] != n) {
    std::ostringstream os;
    os << "(";
    for (size_t i = 0; i < g.size(); ++i) os << (i ? ", " : "") << g[i];
    os << (g.size() == 1 ? ",)" : ")");
    fail("grid must be (rows, cols) of positive ints with rows * cols == N = ", n, ", got ",
         os.str());
  }
  return {g[0], g[1]};
}

void check_size(int64_t h, int64_t s, int64_t p, Score score, int64_t width) {
  const int64_t q_terms = score == Score::kCls ? 1 : s - p;
  // Multiply in double first: a huge shape must give the error, not an overflow.
  const double terms_d = static_cast<double>(h) * q_terms * width;
  const int64_t terms = h * q_terms * width;
  if (terms_d > static_cast<double>(kMaxTerms) || terms > kMaxTerms) {
    fail("attn is too large for exact int64 sums: H * Q' * W' = ", h, " * ", q_terms, " * ", width,
         " = ", terms, " exceeds 2^26");
  }
}

SelectArgs check_keep(int64_t b, int64_t n, int64_t keep, std::string_view strategy,
                      at::OptionalIntArrayRef grid) {
  Strategy st;
  if (strategy == "rank") {
    st = Strategy::kRank;
  } else if (strategy == "row") {
    st = Strategy::kRow;
  } else {
    fail("strategy must be 'rank' or 'row', got '", strategy, "'");
  }
  if (keep < 0 || keep > n) fail("keep must be in [0, N] = [0, ", n, "], got ", keep);
  auto [rows, cols] = resolve_grid(n, grid, st == Strategy::kRow);
  if (st == Strategy::kRow && keep % cols != 0) {
    const int64_t lo = keep / cols * cols;
    fail("keep must be a multiple of cols = ", cols, " for strategy='row', got ", keep,
         ": nearest valid values are ", lo, " and ", lo + cols);
  }
  return SelectArgs{b, n, keep, rows, cols, st};
}

}  // namespace

SigArgs check_significance(const at::Tensor& attn, std::string_view score, int64_t num_prefix) {
  if (attn.dim() != 4) fail("attn must be 4-D (B, H, Q, S), got ", attn.dim(), "-D");
  const auto t = attn.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16 && t != at::kFloat && t != at::kDouble) {
    fail("attn must be float16, bfloat16, float32 or float64, got ", dtype_name(t));
  }
  Score sc;
  if (score == "focal") {
    sc = Score::kFocal;
  } else if (score == "received") {
    sc = Score::kReceived;
  } else if (score == "cls") {
    sc = Score::kCls;
  } else {
    fail("score must be 'focal', 'received' or 'cls', got '", score, "'");
  }
  const int64_t b = attn.size(0), h = attn.size(1), q = attn.size(2), s = attn.size(3);
  if (num_prefix < 0 || num_prefix >= s) {
    fail("num_prefix must be in [0, S) = [0, ", s, ") with S = attn.shape[3], got ", num_prefix);
  }
  if (sc == Score::kCls) {
    if (num_prefix < 1) fail("score='cls' needs num_prefix >= 1 (the CLS token), got 0");
    if (q < 1) fail("score='cls' needs the CLS query row: attn.shape[2] (Q) must be >= 1, got 0");
  } else if (q != s) {
    fail("score='", score, "' needs a square map: attn.shape[2] (Q) must equal attn.shape[3] (S) = ",
         s, ", got ", q);
  }
  check_size(h, s, num_prefix, sc, 1);
  return SigArgs{b, h, q, s, num_prefix, s - num_prefix, sc};
}

SelectArgs check_select(const at::Tensor& sig, int64_t keep, std::string_view strategy,
                        at::OptionalIntArrayRef grid) {
  if (sig.dim() != 2 || sig.scalar_type() != at::kLong) fail("sig must be a 2-D (B, N) int64 tensor");
  return check_keep(sig.size(0), sig.size(1), keep, strategy, grid);
}

PruneArgs check_prune(const at::Tensor& tokens, const at::Tensor& attn, int64_t keep,
                      std::string_view strategy, std::string_view score, int64_t num_prefix,
                      at::OptionalIntArrayRef grid) {
  if (tokens.dim() != 3) fail("tokens must be 3-D (B, N, D), got ", tokens.dim(), "-D");
  const auto t = tokens.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16 && t != at::kFloat) {
    fail("tokens must be float16, bfloat16 or float32, got ", dtype_name(t));
  }
  SigArgs sa = check_significance(attn, score, num_prefix);
  const int64_t b = tokens.size(0), n = tokens.size(1);
  if (attn.device() != tokens.device()) {
    fail("attn must be on the same device as tokens (", device_name(tokens.device()), "), got ",
         device_name(attn.device()));
  }
  if (sa.B != b) fail("attn.shape[0] (B) must equal tokens.shape[0] = ", b, ", got ", sa.B);
  if (sa.N != n) {
    fail("attn.shape[3] - num_prefix must equal tokens.shape[1] (N) = ", n, ", got ", sa.S, " - ",
         num_prefix, " = ", sa.N);
  }
  SelectArgs se = check_keep(b, n, keep, strategy, grid);
  check_size(sa.H, sa.S, sa.P, sa.score, se.strategy == Strategy::kRow ? se.cols : 1);
  return PruneArgs{sa, se, tokens.size(2)};
}

}  // namespace fopru

// Keep these strings identical to SCHEMAS in fopru_kernels/ops.py (tests/test_ops.py checks it).
TORCH_LIBRARY(fopru, m) {
  m.def("significance(Tensor attn, str score=\"focal\", int num_prefix=1) -> Tensor");
  m.def("select(Tensor sig, int keep, str strategy=\"rank\", int[]? grid=None) -> Tensor");
  m.def(
      "prune_tokens(Tensor tokens, Tensor attn, int keep, str strategy=\"rank\", "
      "str score=\"focal\", int num_prefix=1, int[]? grid=None) -> (Tensor, Tensor)");
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
}
