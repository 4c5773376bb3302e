// The one schema of every fopru op, the input checks every backend shares, and the CPU registration.
// A process that loads this library (Python or C++ via torch::ops / torch.ops.load_library) gets
// the ops; the CUDA kernels register themselves from cuda/prune_tokens.cu when built.
#include "ops.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

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

// Python's repr of a tuple of ints ("(2, 3)", "(5,)") or a list ("[1, 2]").
std::string py_seq(at::IntArrayRef v, bool tuple) {
  std::ostringstream os;
  os << (tuple ? "(" : "[");
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << (tuple && v.size() == 1 ? "," : "") << (tuple ? ")" : "]");
  return os.str();
}

// Python's repr of a float: shortest round trip, "2.0" not "2", "inf", "nan".
std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), x);
  std::string out(buf, r.ptr);
  if (out.find_first_of(".e") == std::string::npos) out += ".0";
  return out;
}

Score parse_score(std::string_view score) {
  if (score == "focal") return Score::kFocal;
  if (score == "received") return Score::kReceived;
  if (score == "cls") return Score::kCls;
  fail("score must be 'focal', 'received' or 'cls', got '", score, "'");
}

Strategy parse_strategy(std::string_view strategy) {
  if (strategy == "rank") return Strategy::kRank;
  if (strategy == "row") return Strategy::kRow;
  fail("strategy must be 'rank' or 'row', got '", strategy, "'");
}

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
  const Strategy st = parse_strategy(strategy);
  if (keep < 0 || keep > n) fail("keep must be in [0, N] = [0, ", n, "], got ", keep);
  auto [rows, cols] = resolve_grid(n, grid, st == Strategy::kRow);
  if (st == Strategy::kRow && keep % cols != 0) {
    const int64_t lo = keep / cols * cols;
    fail("keep must be a multiple of cols = ", cols, " for strategy='row', got ", keep,
         ": nearest valid values are ", lo, " and ", lo + cols);
  }
  return SelectArgs{b, n, keep, rows, cols, st};
}

void check_tokens(const at::Tensor& tokens, int64_t dims, const char* shape) {
  if (tokens.dim() != dims) fail("tokens must be ", dims, "-D ", shape, ", got ", tokens.dim(), "-D");
  const auto t = tokens.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16 && t != at::kFloat) {
    fail("tokens must be float16, bfloat16 or float32, got ", dtype_name(t));
  }
}

void check_qk_size(int64_t h, int64_t width) {
  if (static_cast<double>(h) * width > static_cast<double>(kMaxTerms) || h * width > kMaxTerms) {
    fail("q has too many heads for exact int64 sums: H * W' = ", h, " * ", width, " = ", h * width,
         " exceeds 2^26");
  }
}

// q: a `dims`-D float tensor of `shape`; k: q's shape, dtype and device.
void check_q_k(const at::Tensor& q, const at::Tensor& k, int64_t dims, const char* shape) {
  if (q.dim() != dims) fail("q must be ", dims, "-D ", shape, ", got ", q.dim(), "-D");
  const auto t = q.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16 && t != at::kFloat) {
    fail("q must be float16, bfloat16 or float32, got ", dtype_name(t));
  }
  if (k.sizes() != q.sizes()) fail("k must have q's shape ", py_seq(q.sizes(), true), ", got ", py_seq(k.sizes(), true));
  if (k.scalar_type() != t) fail("k must have q's dtype ", dtype_name(t), ", got ", dtype_name(k.scalar_type()));
  if (k.device() != q.device()) {
    fail("k must be on q's device (", device_name(q.device()), "), got ", device_name(k.device()));
  }
}

void check_scale(std::optional<double> scale) {
  if (scale.has_value() && (!std::isfinite(*scale) || *scale == 0.0)) {
    fail("scale must be a finite nonzero float or None, got ", py_float(*scale));
  }
}

// lse: absent, or (kind "prob" only) a float32 tensor of shape `want` (named `names`) on q's device.
void check_lse(const std::optional<at::Tensor>& lse, std::string_view kind, const at::Tensor& q, const char* names,
               at::IntArrayRef want) {
  if (!lse.has_value()) return;
  if (kind != "prob") fail("lse is only used with kind='prob'; pass lse=None for kind='logit'");
  const at::Tensor& l = *lse;
  if (l.scalar_type() != at::kFloat || l.sizes() != want) {
    fail("lse must be a float32 tensor of shape ", names, " = ", py_seq(want, true), ", got ",
         dtype_name(l.scalar_type()), " ", py_seq(l.sizes(), true));
  }
  if (l.device() != q.device()) {
    fail("lse must be on q's device (", device_name(q.device()), "), got ", device_name(l.device()));
  }
}

}  // namespace

SigArgs check_significance(const at::Tensor& attn, std::string_view score, int64_t num_prefix) {
  if (attn.dim() != 4) fail("attn must be 4-D (B, H, Q, S), got ", attn.dim(), "-D");
  const auto t = attn.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16 && t != at::kFloat && t != at::kDouble) {
    fail("attn must be float16, bfloat16, float32 or float64, got ", dtype_name(t));
  }
  const Score sc = parse_score(score);
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
  return SigArgs{b, h, s, num_prefix, s - num_prefix, sc};
}

SelectArgs check_select(const at::Tensor& sig, int64_t keep, std::string_view strategy,
                        at::OptionalIntArrayRef grid) {
  if (sig.dim() != 2 || sig.scalar_type() != at::kLong) fail("sig must be a 2-D (B, N) int64 tensor");
  return check_keep(sig.size(0), sig.size(1), keep, strategy, grid);
}

PruneArgs check_prune(const at::Tensor& tokens, const at::Tensor& attn, int64_t keep,
                      std::string_view strategy, std::string_view score, int64_t num_prefix,
                      at::OptionalIntArrayRef grid) {
  check_tokens(tokens, 3, "(B, N, D)");
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

QkArgs check_significance_qk(const at::Tensor& q, const at::Tensor& k, std::string_view score,
                             int64_t num_prefix, std::optional<double> scale,
                             const std::optional<at::Tensor>& lse, std::string_view kind,
                             std::string_view layout) {
  if (layout != "bhsd" && layout != "bshd") fail("layout must be 'bhsd' or 'bshd', got '", layout, "'");
  const bool bshd = layout == "bshd";
  check_q_k(q, k, 4, bshd ? "(B, S, H, d)" : "(B, H, S, d)");
  const Score sc = parse_score(score);
  if (kind != "prob" && kind != "logit") fail("kind must be 'prob' or 'logit', got '", kind, "'");
  const int hd = bshd ? 2 : 1, sd = bshd ? 1 : 2;
  const int64_t b = q.size(0), h = q.size(hd), s = q.size(sd), d = q.size(3);
  if (d < 1) fail("q's head dim d must be >= 1, got 0");
  if (num_prefix < 0 || num_prefix >= s) {
    fail("num_prefix must be in [0, S) = [0, ", s, ") with S = ", s, " tokens in q, got ", num_prefix);
  }
  if (sc == Score::kCls && num_prefix < 1) fail("score='cls' needs num_prefix >= 1 (the CLS token), got 0");
  check_scale(scale);
  check_lse(lse, kind, q, "(B, H, S)", std::array<int64_t, 3>{b, h, s});
  check_qk_size(h, 1);
  QkArgs a{};
  a.B = b;
  a.H = h;
  a.S = s;
  a.d = d;
  a.P = num_prefix;
  a.N = s - num_prefix;
  a.score = sc;
  a.prob = kind == "prob";
  a.has_lse = lse.has_value();
  a.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(hd);
  a.q_ss = q.stride(sd);
  a.q_sd = q.stride(3);
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(hd);
  a.k_ss = k.stride(sd);
  a.k_sd = k.stride(3);
  return a;
}

PruneQkArgs check_prune_qk(const at::Tensor& tokens, const at::Tensor& q, const at::Tensor& k,
                           int64_t keep, std::string_view strategy, std::string_view score,
                           int64_t num_prefix, at::OptionalIntArrayRef grid,
                           std::optional<double> scale, const std::optional<at::Tensor>& lse,
                           std::string_view kind, std::string_view layout) {
  check_tokens(tokens, 3, "(B, N, D)");
  QkArgs qa = check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout);
  const int64_t b = tokens.size(0), n = tokens.size(1);
  if (q.device() != tokens.device()) {
    fail("q must be on the same device as tokens (", device_name(tokens.device()), "), got ", device_name(q.device()));
  }
  if (qa.B != b) fail("q's batch size B must equal tokens.shape[0] = ", b, ", got ", qa.B);
  if (qa.N != n) {
    fail("q's token count S - num_prefix must equal tokens.shape[1] (N) = ", n, ", got ", qa.S, " - ", num_prefix,
         " = ", qa.N);
  }
  SelectArgs se = check_keep(b, n, keep, strategy, grid);
  check_qk_size(qa.H, se.strategy == Strategy::kRow ? se.cols : 1);
  return PruneQkArgs{qa, se, tokens.size(2)};
}

void check_parts(const at::Tensor& parts) {
  if (parts.dim() != 3 || parts.scalar_type() != at::kLong || (parts.size(1) != 1 && parts.size(1) != 2)) {
    fail("parts must be a 3-D (B, C, N) int64 tensor with C = 2 (focal: column and row sums) or 1, got ",
         dtype_name(parts.scalar_type()), " ", py_seq(parts.sizes(), true));
  }
}

VarlenArgs check_prune_varlen(const at::Tensor& tokens, const at::Tensor& sig, const at::Tensor& cu_seqlens,
                              at::IntArrayRef keep, std::string_view strategy, at::OptionalIntArrayRef grids) {
  check_tokens(tokens, 2, "(T, D)");
  const int64_t t = tokens.size(0);
  if (sig.dim() != 1 || sig.scalar_type() != at::kLong) fail("sig must be a 1-D (T,) int64 tensor");
  if (sig.size(0) != t) fail("sig.shape[0] must equal tokens.shape[0] (T) = ", t, ", got ", sig.size(0));
  if (sig.device() != tokens.device()) {
    fail("sig must be on the same device as tokens (", device_name(tokens.device()), "), got ",
         device_name(sig.device()));
  }
  return check_segments(tokens, cu_seqlens, keep, strategy, grids);
}

VarlenArgs check_segments(const at::Tensor& tokens, const at::Tensor& cu_seqlens, at::IntArrayRef keep,
                          std::string_view strategy, at::OptionalIntArrayRef grids, std::string_view name,
                          int64_t divisor) {
  const int64_t t = tokens.size(0);
  const auto ct = cu_seqlens.scalar_type();
  if (cu_seqlens.dim() != 1 || cu_seqlens.size(0) < 1 || (ct != at::kInt && ct != at::kLong)) {
    fail(name, " must be a 1-D (B + 1,) int32 or int64 tensor");
  }
  if (cu_seqlens.device() != tokens.device()) {
    fail(name, " must be on the same device as tokens (", device_name(tokens.device()), "), got ",
         device_name(cu_seqlens.device()));
  }
  const int64_t b = cu_seqlens.size(0) - 1;
  if (static_cast<int64_t>(keep.size()) != b) {
    fail("keep must hold B = len(", name, ") - 1 = ", b, " ints, got ", keep.size());
  }
  for (int64_t v : keep) {
    if (v < 0) fail("keep must be >= 0 for every image, got ", py_seq(keep, false));
  }
  const Strategy st = parse_strategy(strategy);
  if (st == Strategy::kRow && !grids.has_value()) {
    fail("strategy='row' needs grids=[rows_0, cols_0, rows_1, cols_1, ...] (one grid per image)");
  }
  if (grids.has_value()) {
    const auto g = *grids;
    bool ok = static_cast<int64_t>(g.size()) == 2 * b;
    for (size_t i = 0; ok && i < g.size(); ++i) ok = i % 2 == 0 ? g[i] >= 0 : g[i] > 0;
    if (!ok) {
      fail("grids must hold 2 * B = ", 2 * b, " ints [rows_0, cols_0, ...] with rows >= 0 and cols > 0, got ",
           py_seq(g, false));
    }
  }
  VarlenArgs a{};
  a.B = b;
  a.T = t;
  a.D = tokens.size(1);
  a.strategy = st;
  a.keep.assign(keep.begin(), keep.end());
  a.cols.assign(b, 1);
  a.keep_start.assign(b + 1, 0);
  for (int64_t i = 0; i < b; ++i) {
    if (st == Strategy::kRow) a.cols[i] = (*grids)[2 * i + 1];
    if (keep[i] % a.cols[i] != 0) {
      const int64_t lo = keep[i] / a.cols[i] * a.cols[i];
      fail("keep[", i, "] must be a multiple of cols = ", a.cols[i], " for strategy='row', got ", keep[i],
           ": nearest valid values are ", lo, " and ", lo + a.cols[i]);
    }
    a.keep_start[i + 1] = a.keep_start[i] + keep[i];
  }
  a.total = a.keep_start[b];
  a.values_checked = tokens.device().is_cpu();
  if (!a.values_checked) return a;
  // CPU: read the offsets (no device to sync with) and check them as _checks.py does.
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* raw = cu.const_data_ptr<int64_t>();
  std::vector<int64_t> c(raw, raw + b + 1);
  for (int64_t& v : c) v /= divisor;  // non-negative bounds: C++ and Python division agree
  if (c[0] != 0) fail(name, "[0] must be 0, got ", c[0]);
  if (c[b] != t) fail(name, "[B] must equal tokens.shape[0] (T) = ", t, ", got ", c[b]);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t n = c[i + 1] - c[i];
    if (n < 0) {
      fail(name, " must be non-decreasing, got ", name, "[", i, "] = ", c[i], " > ", name, "[", i + 1, "] = ",
           c[i + 1]);
    }
    if (keep[i] > n) fail("keep[", i, "] must be in [0, n] = [0, ", n, "] (n from ", name, "), got ", keep[i]);
    if (grids.has_value() && (*grids)[2 * i] * (*grids)[2 * i + 1] != n) {
      fail("grids[", i, "] = (", (*grids)[2 * i], ", ", (*grids)[2 * i + 1], ") must have rows * cols == n = ", n,
           " (n from ", name, ")");
    }
  }
  return a;
}

namespace {

// A merged token's score sums H * group values of |fx| <= 2^36; a row score W' of them.
void check_qk_varlen_size(int64_t h, int64_t group, int64_t width) {
  const double terms_d = static_cast<double>(h) * group * width;
  const int64_t terms = h * group * width;
  if (terms_d > static_cast<double>(kMaxTerms) || terms > kMaxTerms) {
    fail("q has too many heads for exact int64 sums: H * group * W' = ", h, " * ", group, " * ", width, " = ", terms,
         " exceeds 2^26");
  }
}

}  // namespace

QkVarlenArgs check_significance_qk_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                          std::string_view score, std::optional<double> scale,
                                          const std::optional<at::Tensor>& lse, std::string_view kind,
                                          int64_t group) {
  check_q_k(q, k, 3, "(T, H, d)");
  if (score != "focal" && score != "received") {
    fail("score must be 'focal' or 'received' (packed segments have no CLS token), got '", score, "'");
  }
  if (kind != "prob" && kind != "logit") fail("kind must be 'prob' or 'logit', got '", kind, "'");
  const int64_t t = q.size(0), h = q.size(1), d = q.size(2);
  if (h < 1) fail("q must have at least one head: q.shape[1] (H) must be >= 1, got 0");
  if (d < 1) fail("q's head dim d must be >= 1, got 0");
  check_scale(scale);
  if (group < 1) fail("group must be an int >= 1, got ", group);
  if (t % group != 0) fail("q.shape[0] (T) = ", t, " must be a multiple of group = ", group);
  const auto ct = cu_seqlens.scalar_type();
  if (cu_seqlens.dim() != 1 || cu_seqlens.size(0) < 1 || (ct != at::kInt && ct != at::kLong)) {
    fail("cu_seqlens must be a 1-D (S + 1,) int32 or int64 tensor");
  }
  if (cu_seqlens.device() != q.device()) {
    fail("cu_seqlens must be on q's device (", device_name(q.device()), "), got ", device_name(cu_seqlens.device()));
  }
  check_lse(lse, kind, q, "(H, T)", std::array<int64_t, 2>{h, t});
  check_qk_varlen_size(h, group, 1);
  QkVarlenArgs a{};
  a.T = t;
  a.H = h;
  a.d = d;
  a.S = cu_seqlens.size(0) - 1;
  a.group = group;
  a.received = score == "received";
  a.prob = kind == "prob";
  a.has_lse = lse.has_value();
  a.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
  a.q_st = q.stride(0);
  a.q_sh = q.stride(1);
  a.q_sd = q.stride(2);
  a.k_st = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_sd = k.stride(2);
  a.lse_sh = a.has_lse ? lse->stride(0) : 0;
  a.lse_st = a.has_lse ? lse->stride(1) : 0;
  a.values_checked = q.device().is_cpu();
  if (!a.values_checked) return a;
  // CPU: the attention segments, as _checks.check_attention_segments does.
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* c = cu.const_data_ptr<int64_t>();
  if (c[0] != 0) fail("cu_seqlens[0] must be 0, got ", c[0]);
  if (c[a.S] != t) fail("cu_seqlens[S] must equal q.shape[0] (T) = ", t, ", got ", c[a.S]);
  for (int64_t i = 0; i < a.S; ++i) {
    const int64_t n = c[i + 1] - c[i];
    if (n < 0) {
      fail("cu_seqlens must be non-decreasing, got cu_seqlens[", i, "] = ", c[i], " > cu_seqlens[", i + 1, "] = ",
           c[i + 1]);
    }
    if (n % group != 0) {
      fail("segment ", i, " has n = ", n, " tokens (from cu_seqlens), not a multiple of group = ", group);
    }
  }
  return a;
}

PruneQkVarlenArgs check_prune_qk_varlen(const at::Tensor& tokens, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& cu_seqlens, at::IntArrayRef keep,
                                        std::string_view strategy, std::string_view score,
                                        std::optional<double> scale, const std::optional<at::Tensor>& lse,
                                        std::string_view kind, int64_t group,
                                        const std::optional<at::Tensor>& cu_seqlens_select,
                                        at::OptionalIntArrayRef grids) {
  check_tokens(tokens, 2, "(T / group, D)");
  QkVarlenArgs qa = check_significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group);
  if (q.device() != tokens.device()) {
    fail("q must be on the same device as tokens (", device_name(tokens.device()), "), got ", device_name(q.device()));
  }
  const int64_t m = qa.T / group;
  if (tokens.size(0) != m) {
    fail("tokens.shape[0] must equal q.shape[0] / group = ", qa.T, " / ", group, " = ", m, ", got ", tokens.size(0));
  }
  VarlenArgs sel = cu_seqlens_select.has_value()
                       ? check_segments(tokens, *cu_seqlens_select, keep, strategy, grids, "cu_seqlens_select")
                       : check_segments(tokens, cu_seqlens, keep, strategy, grids, "cu_seqlens / group", group);
  int64_t width = 1;
  for (int64_t c : sel.cols) width = std::max(width, c);
  check_qk_varlen_size(qa.H, group, width);
  return PruneQkVarlenArgs{qa, sel};
}

}  // namespace fopru

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
  // Interim: no kernel registers these two yet; fopru_kernels/ops.py serves them with the
  // float64 reference on CPU and CUDA tensors until the kernels land.
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
