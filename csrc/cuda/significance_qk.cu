// CUDA kernels of fopru::significance_qk / prune_tokens_qk (SPEC.md "Significance from q and k"),
// registered for the CUDA key. The S x S attention map is never materialised.
//
// Launch plan (v = scale * q_i . k_j for logit, exp(v - lse_i) for prob; P prefix tokens, N patches):
//   cls               [prob without lse: _qk_lse_kernel for query 0] + _qk_dot_kernel: CTA per
//                     (image, block of keys), query 0 of every head in shared memory,
//                     sig = sum_h fx(v) summed in registers, one plain store per key.
//   received / focal, logit
//                     _qk_patch_sum_kernel (qsum = sum_i q_i and, for focal, ksum = sum_j k_j per
//                     image and head) + _qk_dot_kernel (colmean_j = scale / N * qsum . k_j, and
//                     rowmean_i = scale / N * q_i . ksum): O(B H S d), no S x S work.
//   received / focal, prob
//                     [no lse: _qk_lse_kernel] + memset + _qk_prob_map_kernel (tiles of the patch
//                     block of the map on tensor cores, FlashAttention-backward style: CTA per
//                     (image, head, group of key blocks), looping over query blocks; exact column
//                     sums per CTA, int64 atomics across heads) + for focal _qk_row_finish_kernel.
// Then the focal choice, selection and gather of cuda/prune_tokens.cu (stages.h). The device code
// the kernels are built from is in qk_tiles.cuh (tiles), qk_prob.cuh (the prob path's lse and sums) and
// qk_rows.cuh (row dots and patch sums); this file keeps the five kernels with the launchers that
// size their grids, shared memory and workspaces, which are read together.
//
// Determinism: every float sum runs in an order fixed by (N, d, dtype, vector path); none depends
// on B, on scheduling or on float atomics, so an image's significance does not depend on its batch.
// Head sums are int64 fixed-point sums, exact in any order, so they may use atomics.
// Focal rows of probabilities are direct sums sum_{j<N} p_ij, not 1 - sum_{j<P} p_ij: the identity
// holds only for the exact lse, and a given lse (SDPA's) is only close to it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

#include "common.cuh"
#include "fopru.h"
#include "ops.h"
#include "qk_prob.cuh"
#include "qk_rows.cuh"
#include "qk_tiles.cuh"
#include "stages.h"

namespace fopru {
namespace {

constexpr int kFinishThreads = 256;

// Grid (B * cpi, jobs). Dynamic shared memory: hc * d floats of u, then hc floats of lse2.
template <typename T>
__global__ void __launch_bounds__(kDotThreads) _qk_dot_kernel(DotJob job0, DotJob job1, DotSpec sp) {
  extern __shared__ __align__(16) unsigned char smem[];
  const DotJob job = blockIdx.y == 0 ? job0 : job1;  // a copy: a reference to a parameter would spill both
  const int64_t b = blockIdx.x / sp.cpi, chunk = blockIdx.x - b * sp.cpi;
  dot_rows_of<T>(job, sp, b, chunk, reinterpret_cast<float*>(smem));
}

// Grid (B * H, jobs); out is (jobs, B, H, d) float32.
template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    _qk_patch_sum_kernel(SumJob job0, SumJob job1, int64_t B, int64_t H, int64_t N, int64_t P, int64_t d,
                         float* __restrict__ out) {
  // rg * C <= blockDim.x when rg > 1, so the partials take at most blockDim.x * 16 / sizeof(T) floats.
  __shared__ float part[kSumThreads * 8];
  const SumJob job = blockIdx.y == 0 ? job0 : job1;  // a copy: a reference to a parameter would spill both
  const int64_t b = blockIdx.x / H, h = blockIdx.x - b * H;
  sum_rows_of<T>(job, b, h, N, P, d, out + ((static_cast<int64_t>(blockIdx.y) * B + b) * H + h) * d, part);
}

// ---------------------------------------------------------------------------------------------
// _qk_lse_kernel: lse2[b, h, i] = log2 sum_{s<S} 2^(c2 * q[b, h, r0 + i] . k[b, h, s]) for i < nr
// ---------------------------------------------------------------------------------------------

struct LseSpec {
  MatView q, k;
  bool q_vec, k_vec;
  int64_t H, S, r0, nr, nqb;
  TileGeom tg;
  float c2;    // scale * log2(e)
  float* out;  // (B, H, nr)
};

// CTA per (image, head, block of 64 queries): qk_prob.cuh's lse_rows over all S keys.
template <typename T>
__global__ void __launch_bounds__(kMapThreads) _qk_lse_kernel(const LseSpec sp) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t cta = blockIdx.x;
  const int64_t bh = cta / sp.nqb, qb = cta - bh * sp.nqb;
  const int64_t b = bh / sp.H, h = bh - b * sp.H;
  const int64_t i0 = qb * kTile;
  const T* q = static_cast<const T*>(sp.q.p) + b * sp.q.sb + h * sp.q.sh + (sp.r0 + i0) * sp.q.ss;
  const T* k = static_cast<const T*>(sp.k.p) + b * sp.k.sb + h * sp.k.sh;
  lse_rows<T>(HeadRows<T>{q, sp.q.ss, sp.q.sd, sp.q_vec}, min64(kTile, sp.nr - i0),
              HeadRows<T>{k, sp.k.ss, sp.k.sd, sp.k_vec}, sp.S, sp.tg, sp.c2, sp.out + bh * sp.nr + i0, smem);
}

// ---------------------------------------------------------------------------------------------
// _qk_prob_map_kernel: column (and row) sums of p_ij = 2^(c2 l_ij - lse2_i) over the patch block
// ---------------------------------------------------------------------------------------------

struct MapSpec {
  MatView q, k;
  bool q_vec, k_vec;
  int64_t B, H, N, P;
  TileGeom tg;
  MapSplit split;  // map_split(N)
  float c2;        // scale * log2(e)
  LseView lse;     // lse2 of patch query i: lse.at(b, h, i)
  int64_t* col;    // col[b * col_sb + j] += sum_h fx(colmean), zeroed before
  int64_t col_sb;
  float* row_part;  // focal: (2 * groups, B, H, N) partial row sums; null for received
};

// CTA per (image, head, group of kpg key blocks): qk_prob.cuh's prob_map_keys on the patch block.
template <typename T>
__global__ void __launch_bounds__(kMapThreads) _qk_prob_map_kernel(const MapSpec sp) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t cta = blockIdx.x;
  const int64_t bh = cta / sp.split.groups, grp = cta - bh * sp.split.groups;
  const int64_t b = bh / sp.H, h = bh - b * sp.H;
  const T* q = static_cast<const T*>(sp.q.p) + b * sp.q.sb + h * sp.q.sh + sp.P * sp.q.ss;
  const T* k = static_cast<const T*>(sp.k.p) + b * sp.k.sb + h * sp.k.sh + sp.P * sp.k.ss;
  const int64_t kb0 = grp * sp.split.kpg, kb1 = min64(sp.split.nkb, kb0 + sp.split.kpg);
  // Slot (2 grp + column warp) of the row partials: ((slot * B + b) * H + h) * N.
  float* rows0 = sp.row_part != nullptr ? sp.row_part + ((2 * grp * sp.B + b) * sp.H + h) * sp.N : nullptr;
  prob_map_keys<T>(HeadRows<T>{q, sp.q.ss, sp.q.sd, sp.q_vec}, HeadRows<T>{k, sp.k.ss, sp.k.sd, sp.k_vec}, sp.N, kb0,
                   kb1, sp.lse.row(b, h), sp.tg, sp.c2, sp.col + b * sp.col_sb, rows0, sp.B * sp.H * sp.N, smem);
}

// row[b * row_sb + i] = qk_prob.cuh's row_sum_fx over the slots of part (slots, B, H, N).
__global__ void __launch_bounds__(kFinishThreads)
    _qk_row_finish_kernel(const float* __restrict__ part, int64_t slots, int64_t B, int64_t H, int64_t N,
                          int64_t* __restrict__ row, int64_t row_sb) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * N) return;
  const int64_t b = idx / N, i = idx - b * N;
  row[b * row_sb + i] = row_sum_fx(part + b * H * N, slots, B * H * N, N, H, N, i);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

LseView given_lse(const at::Tensor& lse, int64_t s0) {
  return LseView{lse.const_data_ptr<float>(), lse.stride(0), lse.stride(1), lse.stride(2), s0,
                 static_cast<float>(kLog2e)};
}

// lse2 of queries r0 .. r0 + nr - 1 of every (image, head) into ws (B, H, nr); returns its view.
template <typename T>
LseView launch_lse(const MatView& q, bool q_vec, const MatView& k, bool k_vec, const QkArgs& a, int64_t r0, int64_t nr,
                   at::Tensor& ws, const Ctx& ctx) {
  ws = at::empty({a.B, a.H, nr}, ctx.opts.dtype(at::kFloat));
  float* out = ws.mutable_data_ptr<float>();
  const TileGeom tg = tile_geom(a.d, sizeof(T));
  LseSpec sp{q, k, q_vec, k_vec, a.H, a.S, r0, nr, ceil_div(nr, kTile), tg, static_cast<float>(a.scale * kLog2e), out};
  const int64_t blocks = a.B * a.H * sp.nqb;
  if (blocks > 0) {
    TORCH_CHECK(blocks <= INT_MAX, "fopru: q/k too large for one launch (", blocks, " CTAs)");
    const auto kernel = _qk_lse_kernel<T>;
    allow_tile_smem<_qk_lse_kernel<T>>("significance_qk", tg, ctx);
    kernel<<<static_cast<unsigned>(blocks), kMapThreads, tg.bytes, ctx.stream>>>(sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return LseView{out, a.H * nr, nr, 1, 0, 1.0f};
}

// One or two dot jobs sharing spec `sp` (n, c, prob, lse set by the caller).
template <typename T>
void launch_dot(const DotJob& job0, const DotJob* job1, DotSpec sp, int64_t B, const Ctx& ctx) {
  int64_t cpi = 0;
  for (const DotJob* j : {&job0, job1}) {
    if (j != nullptr) cpi = std::max(cpi, ceil_div(sp.n, dot_rows_per_cta(sp.d, j->vec, sizeof(T))));
  }
  sp.cpi = cpi;
  sp.hc = dot_heads_per_pass(sp.H, sp.d);
  const int64_t blocks = B * cpi;
  TORCH_CHECK(blocks <= INT_MAX, "fopru: q/k too large for one launch (", blocks, " CTAs)");
  const dim3 grid(static_cast<unsigned>(blocks), job1 != nullptr ? 2u : 1u);
  _qk_dot_kernel<T><<<grid, kDotThreads, dot_smem_bytes(sp), ctx.stream>>>(job0, job1 != nullptr ? *job1 : job0, sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Column sums (and, when row is non-null, row sums) of SPEC.md's q/k significance: col[b * sb + j],
// row[b * sb + i], int64. cls writes only col.
template <typename T>
void qk_sums(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse, const QkArgs& a,
             int64_t* col, int64_t* row, int64_t sb, const Ctx& ctx) {
  constexpr int64_t es = sizeof(T);
  const MatView qv{q.data_ptr(), a.q_sb, a.q_sh, a.q_ss, a.q_sd};
  const MatView kv{k.data_ptr(), a.k_sb, a.k_sh, a.k_ss, a.k_sd};
  const bool q_vec = rows_vectorizable(qv, es, a.d, a.B, a.H), k_vec = rows_vectorizable(kv, es, a.d, a.B, a.H);
  const bool focal = row != nullptr;
  at::Tensor lse_ws;  // freed after the launches: the caching allocator orders its reuse on this stream

  if (a.score == Score::kCls || !a.prob) {
    DotSpec sp{};
    sp.H = a.H;
    sp.n = a.N;
    sp.d = a.d;
    sp.prob = a.prob;
    DotJob cj{kv, a.P, k_vec, {}, false, col, sb};
    if (a.score == Score::kCls) {  // u = query 0
      cj.u = qv;
      sp.c = static_cast<float>(a.prob ? a.scale * kLog2e : a.scale);
      if (a.prob) sp.lse = a.has_lse ? given_lse(*lse, 0) : launch_lse<T>(qv, q_vec, kv, k_vec, a, 0, 1, lse_ws, ctx);
      launch_dot<T>(cj, nullptr, sp, a.B, ctx);
      return;
    }
    // logit means: u = qsum (columns), ksum (rows); colmean = scale / N * qsum . k_j.
    const at::Tensor sums = at::empty({focal ? 2 : 1, a.B, a.H, a.d}, ctx.opts.dtype(at::kFloat));
    float* s = sums.mutable_data_ptr<float>();
    if (a.B * a.H > 0 && a.d > 0) {
      TORCH_CHECK(a.B * a.H <= INT_MAX, "fopru: q/k too large for one launch (", a.B * a.H, " CTAs)");
      const dim3 grid(static_cast<unsigned>(a.B * a.H), focal ? 2u : 1u);
      _qk_patch_sum_kernel<T><<<grid, kSumThreads, 0, ctx.stream>>>(SumJob{qv, q_vec}, SumJob{kv, k_vec}, a.B, a.H,
                                                                    a.N, a.P, a.d, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sp.c = static_cast<float>(a.scale / static_cast<double>(a.N));
    cj.u = MatView{s, a.H * a.d, a.d, 0, 1};
    cj.u_f32 = true;
    const DotJob rj{qv, a.P, q_vec, MatView{s + a.B * a.H * a.d, a.H * a.d, a.d, 0, 1}, true, row, sb};
    launch_dot<T>(cj, focal ? &rj : nullptr, sp, a.B, ctx);
    return;
  }

  // prob received / focal.
  const LseView lv = a.has_lse ? given_lse(*lse, a.P) : launch_lse<T>(qv, q_vec, kv, k_vec, a, a.P, a.N, lse_ws, ctx);
  C10_CUDA_CHECK(cudaMemsetAsync(col, 0, static_cast<size_t>(a.B * sb) * sizeof(int64_t), ctx.stream));
  const TileGeom tg = tile_geom(a.d, es);
  MapSpec sp{};
  sp.q = qv;
  sp.k = kv;
  sp.q_vec = q_vec;
  sp.k_vec = k_vec;
  sp.B = a.B;
  sp.H = a.H;
  sp.N = a.N;
  sp.P = a.P;
  sp.tg = tg;
  // The key-block split depends on N only, so the row sums' float order does not depend on B.
  sp.split = map_split(a.N);
  sp.c2 = static_cast<float>(a.scale * kLog2e);
  sp.lse = lv;
  sp.col = col;
  sp.col_sb = sb;
  at::Tensor part;
  if (focal) {
    part = at::empty({2 * sp.split.groups, a.B, a.H, a.N}, ctx.opts.dtype(at::kFloat));
    sp.row_part = part.mutable_data_ptr<float>();
  }
  const int64_t blocks = a.B * a.H * sp.split.groups;
  if (blocks > 0) {
    TORCH_CHECK(blocks <= INT_MAX, "fopru: q/k too large for one launch (", blocks, " CTAs)");
    const auto kernel = _qk_prob_map_kernel<T>;
    allow_tile_smem<_qk_prob_map_kernel<T>>("significance_qk", tg, ctx);
    kernel<<<static_cast<unsigned>(blocks), kMapThreads, tg.bytes, ctx.stream>>>(sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (focal) {
    const int64_t fb = ceil_div(a.B * a.N, kFinishThreads);
    TORCH_CHECK(fb <= INT_MAX, "fopru: q/k too large for one launch (", fb, " CTAs)");
    _qk_row_finish_kernel<<<static_cast<unsigned>(fb), kFinishThreads, 0, ctx.stream>>>(
        sp.row_part, 2 * sp.split.groups, a.B, a.H, a.N, row, sb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Column sums into sums[:, :N] and, for focal, row sums into sums[:, N:] of sums (B, N or 2N).
void compute_sums(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse, const QkArgs& a,
                  at::Tensor& sums) {
  const Ctx ctx = make_ctx(q, kQkSmemReserve);
  int64_t* base = sums.mutable_data_ptr<int64_t>();
  int64_t* row = a.score == Score::kFocal ? base + a.N : nullptr;
  dispatch_qk(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    qk_sums<T>(q, k, lse, a, base, row, sums.stride(0), ctx);
  });
}

}  // namespace

at::Tensor significance_qk_cuda(const at::Tensor& q, const at::Tensor& k, c10::string_view score, int64_t num_prefix,
                                std::optional<double> scale, const std::optional<at::Tensor>& lse,
                                c10::string_view kind, c10::string_view layout) {
  const QkArgs a = check_significance_qk(q, k, std::string_view(score.data(), score.size()), num_prefix, scale, lse,
                                         std::string_view(kind.data(), kind.size()),
                                         std::string_view(layout.data(), layout.size()));
  check_head_dim("significance_qk", a.d);
  const c10::cuda::CUDAGuard guard(q.device());
  if (a.B == 0 || a.N == 0) return at::empty({a.B, a.N}, q.options().dtype(at::kLong));
  const bool focal = a.score == Score::kFocal;
  at::Tensor sums = at::empty({a.B, focal ? 2 * a.N : a.N}, q.options().dtype(at::kLong));
  compute_sums(q, k, lse, a, sums);
  if (!focal) return sums;
  return choose_significance_cuda(sums.narrow(1, 0, a.N), sums.narrow(1, a.N, a.N));
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_qk_cuda(const at::Tensor& tokens, const at::Tensor& q,
                                                        const at::Tensor& k, int64_t keep, c10::string_view strategy,
                                                        c10::string_view score, int64_t num_prefix,
                                                        at::OptionalIntArrayRef grid, std::optional<double> scale,
                                                        const std::optional<at::Tensor>& lse, c10::string_view kind,
                                                        c10::string_view layout) {
  const PruneQkArgs p = check_prune_qk(tokens, q, k, keep, std::string_view(strategy.data(), strategy.size()),
                                       std::string_view(score.data(), score.size()), num_prefix, grid, scale, lse,
                                       std::string_view(kind.data(), kind.size()),
                                       std::string_view(layout.data(), layout.size()));
  check_head_dim("significance_qk", p.qk.d);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const QkArgs& a = p.qk;
  if (a.B == 0 || keep == 0) {
    return {at::empty({a.B, keep, p.D}, tokens.options()), at::empty({a.B, keep}, tokens.options().dtype(at::kLong))};
  }
  const bool focal = a.score == Score::kFocal;
  at::Tensor sums = at::empty({a.B, focal ? 2 * a.N : a.N}, q.options().dtype(at::kLong));
  compute_sums(q, k, lse, a, sums);
  return select_gather_cuda(tokens, sums.narrow(1, 0, a.N), focal ? sums.narrow(1, a.N, a.N) : at::Tensor(), p.sel);
}

// The sums significance_qk chooses from, (B, C, N): compute_sums' (B, C * N) layout as it is.
at::Tensor significance_qk_parts_cuda(const at::Tensor& q, const at::Tensor& k, c10::string_view score,
                                      int64_t num_prefix, std::optional<double> scale,
                                      const std::optional<at::Tensor>& lse, c10::string_view kind,
                                      c10::string_view layout) {
  const QkArgs a = check_significance_qk(q, k, std::string_view(score.data(), score.size()), num_prefix, scale, lse,
                                         std::string_view(kind.data(), kind.size()),
                                         std::string_view(layout.data(), layout.size()));
  check_head_dim("significance_qk", a.d);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor parts = at::empty({a.B, a.score == Score::kFocal ? 2 : 1, a.N}, q.options().dtype(at::kLong));
  if (a.B == 0 || a.N == 0) return parts;
  compute_sums(q, k, lse, a, parts);
  return parts;
}

at::Tensor significance_from_parts_cuda(const at::Tensor& parts) {
  check_parts(parts);
  const c10::cuda::CUDAGuard guard(parts.device());
  const at::Tensor p = parts.contiguous();
  if (p.size(1) == 1) return p.select(1, 0).clone(at::MemoryFormat::Contiguous);
  return choose_significance_cuda(p.select(1, 0), p.select(1, 1));
}

}  // namespace fopru

TORCH_LIBRARY_IMPL(fopru, CUDA, m) {
  m.impl("significance_qk", &fopru::significance_qk_cuda);
  m.impl("prune_tokens_qk", &fopru::prune_tokens_qk_cuda);
  m.impl("significance_qk_parts", &fopru::significance_qk_parts_cuda);
  m.impl("significance_from_parts", &fopru::significance_from_parts_cuda);
}
