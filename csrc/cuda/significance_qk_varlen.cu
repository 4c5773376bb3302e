// CUDA kernels of fopru::significance_qk_varlen / prune_tokens_qk_varlen (SPEC.md "Packed batches from q
// and k"), registered for the CUDA key. Every attention segment is scored as cuda/significance_qk.cu
// scores an image with no prefix token: the same device bodies (qk_rows.cuh, qk_prob.cuh) on the
// segment's rows, split into the same units (functions of the segment's length only), so a segment's
// float work is the dense kernel's on that segment alone, in the same order, and the dense path's
// error bound holds per segment.
//
// The host never reads cu_seqlens (a sync): it sizes every grid from T, S and H, one launch per stage
// covers all segments, and CUDA graphs capture the calls as they are.
//   _varlen_plan_kernel       one CTA: checks cu_seqlens as SPEC.md requires, writes each segment's
//                             bounds and the prefix sums over the segments of each stage's units (an
//                             int64 workspace); an invalid cu_seqlens raises a flag every stage reads.
//   logit                     _varlen_patch_sum_kernel (CTA per (segment, head): qsum and, for focal,
//                             ksum) + _varlen_dot_kernel (CTA per (segment, chunk of rows), all heads:
//                             colmean_j = scale / n * qsum . k_j, rowmean_i = scale / n * q_i . ksum).
//   prob                      [no lse: _varlen_lse_kernel, CTA per (segment, 64 queries, head)] + memset +
//                             _varlen_prob_map_kernel (CTA per (segment, group of key blocks, head)) + for
//                             focal _varlen_row_finish_kernel (thread per token).
//   _varlen_choose_kernel     CTA per segment: its column sums (received) or the exact focal choice
//                             (select.cuh's block_focal_sum, fopru.h's focal_use_col), then the group
//                             sums; INT64_MIN everywhere for an invalid cu_seqlens.
// prune_tokens_qk_varlen hands sig to prune_tokens_varlen.cu's selection + gather (prune_segments_cuda,
// stages.h) over the selection segments, with the plan's flag.
//
// Scheduling: a stage's CTAs are its (segment, unit, head) items in that order, the CTA index mapped to
// its item by a binary search in the plan's prefix sums. The grid is the host's bound on the item count
// (every unit holds at least one token and a segment at most one partial unit), and CTAs past the real
// count return at once. Segments of 4 and of 4096 tokens thus share one launch, each spread over as
// many CTAs as the dense kernel gives an image of its size, and no host loop over segments exists.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
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
#include "select.cuh"
#include "stages.h"

namespace fopru {
namespace {

constexpr int kPlanThreads = kSelectThreads;    // block_exclusive_scan (select.cuh) over the segments
constexpr int kChooseThreads = kSelectThreads;  // block_focal_sum (select.cuh) takes kSelectThreads
constexpr int kRowThreads = 256;
constexpr const char* kOp = "significance_qk_varlen";

// ---------------------------------------------------------------------------------------------
// The plan: an int64 workspace [flag][bounds: S + 1][lse units: S + 1][map units: S + 1][dot units:
// S + 1][row partial floats: S + 1]. bounds[s] = cu_seqlens[s]; each other array holds the exclusive
// prefix sums over the segments of that stage's units (entry S: the total). flag != 0: cu_seqlens
// broke SPEC.md's requirements, no stage computes anything and sig is INT64_MIN.
// ---------------------------------------------------------------------------------------------

enum PlanArray : int { kBounds = 0, kLseUnits, kMapUnits, kDotUnits, kPartFloats, kPlanArrays };

struct Plan {
  int64_t* p;
  int64_t S;
  static int64_t words(int64_t S) { return 1 + kPlanArrays * (S + 1); }
  __device__ __forceinline__ int64_t* arr(int a) const { return p + 1 + a * (S + 1); }
  __device__ __forceinline__ bool invalid() const { return p[0] != 0; }
  // Segment s owns tokens [t0, t0 + n).
  __device__ __forceinline__ void segment(int64_t s, int64_t& t0, int64_t& n) const {
    const int64_t* b = arr(kBounds);
    t0 = b[s];
    n = b[s + 1] - t0;
  }
};

// Item x of a stage's grid over (segment, unit, head) items, heads fastest: false when the plan is
// invalid or x lies past its item count, else the segment s, its unit u and the head h.
__device__ __forceinline__ bool stage_item(const Plan& plan, int units, int64_t H, int64_t x, int64_t& s, int64_t& u,
                                           int64_t& h) {
  if (plan.invalid()) return false;
  const int64_t* start = plan.arr(units);
  const int64_t unit = x / H;
  if (unit >= start[plan.S]) return false;
  h = x - unit * H;
  s = last_at_most(start, plan.S, unit);
  u = unit - start[s];
  return true;
}

struct PlanSpec {
  const void* cu;  // cu_seqlens (S + 1,), int32 or int64, element stride cu_stride
  int64_t cu_stride;
  bool cu64;
  int64_t T, H, group;
  int64_t dot_rows;  // rows per CTA of _varlen_dot_kernel
  Plan plan;
};

__device__ __forceinline__ int64_t plan_cu(const PlanSpec& sp, int64_t i) {
  return sp.cu64 ? static_cast<const int64_t*>(sp.cu)[i * sp.cu_stride]
                 : static_cast<int64_t>(static_cast<const int32_t*>(sp.cu)[i * sp.cu_stride]);
}

// One CTA of kPlanThreads over the segments, kPlanThreads at a time (uniform trip count: every
// thread takes part in the scans).
__global__ void __launch_bounds__(kPlanThreads) _varlen_plan_kernel(const PlanSpec sp) {
  __shared__ SelectShared sh;
  const Plan plan = sp.plan;
  const int64_t S = plan.S;
  int bad = threadIdx.x == 0 && (plan_cu(sp, 0) != 0 || plan_cu(sp, S) != sp.T);
  ull carry[kPlanArrays] = {};
  for (int64_t base = 0; base < S; base += blockDim.x) {
    const int64_t s = base + threadIdx.x;
    ull units[kPlanArrays] = {};
    if (s < S) {
      const int64_t c0 = plan_cu(sp, s), c1 = plan_cu(sp, s + 1);
      const bool ok = c0 >= 0 && c0 <= c1 && c1 <= sp.T && (c1 - c0) % sp.group == 0;
      bad |= !ok;
      const int64_t n = ok ? c1 - c0 : 0;
      const MapSplit m = map_split(n);
      plan.arr(kBounds)[s] = c0;
      units[kLseUnits] = static_cast<ull>((n + kTile - 1) / kTile);
      units[kMapUnits] = static_cast<ull>(m.groups);
      units[kDotUnits] = static_cast<ull>((n + sp.dot_rows - 1) / sp.dot_rows);
      units[kPartFloats] = static_cast<ull>(2 * m.groups * sp.H * n);
    }
#pragma unroll
    for (int a = kLseUnits; a < kPlanArrays; ++a) {
      ull total;
      const ull before = block_exclusive_scan(units[a], total, sh);
      if (s < S) plan.arr(a)[s] = static_cast<int64_t>(carry[a] + before);
      carry[a] += total;
    }
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    plan.arr(kBounds)[S] = plan_cu(sp, S);
#pragma unroll
    for (int a = kLseUnits; a < kPlanArrays; ++a) plan.arr(a)[S] = static_cast<int64_t>(carry[a]);
    plan.p[0] = bad;
  }
}

// ---------------------------------------------------------------------------------------------
// logit: the closed forms
// ---------------------------------------------------------------------------------------------

// Grid (S * H, jobs); out (jobs, S, H, d) float32: the sums over segment s of the rows of head h.
template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    _varlen_patch_sum_kernel(SumJob job0, SumJob job1, Plan plan, int64_t H, int64_t d, float* __restrict__ out) {
  __shared__ float part[kSumThreads * 8];  // as _qk_patch_sum_kernel's
  if (plan.invalid()) return;
  const int64_t s = blockIdx.x / H, h = blockIdx.x - s * H;
  int64_t t0, n;
  plan.segment(s, t0, n);
  if (n == 0) return;
  // The segment as an image (batch stride 0) whose first patch row is token t0.
  const SumJob job = blockIdx.y == 0 ? job0 : job1;  // a copy: a reference to a parameter would spill both
  sum_rows_of<T>(job, 0, h, n, t0, d, out + ((static_cast<int64_t>(blockIdx.y) * plan.S + s) * H + h) * d, part);
}

// Grid (dot unit bound, jobs). A job's x, u and out come without their segment: x and out from token
// 0 with batch stride 0, u with batch stride H * d (row s of the sums); this CTA sets row0 = t0 and
// out += t0, and the segment's n and scale / n (rounded as cuda/significance_qk.cu rounds scale / N).
template <typename T>
__global__ void __launch_bounds__(kDotThreads)
    _varlen_dot_kernel(DotJob job0, DotJob job1, DotSpec sp, Plan plan, double scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t s, chunk, h;
  if (!stage_item(plan, kDotUnits, 1, blockIdx.x, s, chunk, h)) return;
  int64_t t0, n;
  plan.segment(s, t0, n);
  DotJob job = blockIdx.y == 0 ? job0 : job1;
  job.row0 = t0;
  job.out += t0;
  sp.n = n;
  sp.c = static_cast<float>(scale / static_cast<double>(n));
  dot_rows_of<T>(job, sp, s, chunk, reinterpret_cast<float*>(smem));
}

// ---------------------------------------------------------------------------------------------
// prob: the tiles
// ---------------------------------------------------------------------------------------------

struct TilesSpec {
  MatView q, k;  // element (t, h, e) at p + h * sh + t * ss + e * sd (sb unused)
  bool q_vec, k_vec;
  int64_t H, T;
  TileGeom tg;
  float c2;  // scale * log2(e)
  Plan plan;
};

template <typename T>
__device__ __forceinline__ HeadRows<T> head_rows(const MatView& m, bool vec, int64_t h, int64_t t0) {
  return HeadRows<T>{static_cast<const T*>(m.p) + h * m.sh + t0 * m.ss, m.ss, m.sd, vec};
}

// lse2 (H, T) of every token over its segment's keys: CTA per (segment, block of 64 queries, head).
template <typename T>
__global__ void __launch_bounds__(kMapThreads) _varlen_lse_kernel(const TilesSpec sp, float* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t s, qb, h;
  if (!stage_item(sp.plan, kLseUnits, sp.H, blockIdx.x, s, qb, h)) return;
  int64_t t0, n;
  sp.plan.segment(s, t0, n);
  const int64_t i0 = qb * kTile;
  lse_rows<T>(head_rows<T>(sp.q, sp.q_vec, h, t0 + i0), min64(kTile, n - i0), head_rows<T>(sp.k, sp.k_vec, h, t0), n,
              sp.tg, sp.c2, out + h * sp.T + t0 + i0, smem);
}

// Column sums into col (T,) by int64 atomics (zeroed before) and, when part is non-null, row partials:
// segment s's (2 * groups, H, n) floats from part + plan.arr(kPartFloats)[s]. CTA per (segment, group of
// key blocks, head). lse: sb unused, s0 set here to the segment's first token.
template <typename T>
__global__ void __launch_bounds__(kMapThreads)
    _varlen_prob_map_kernel(const TilesSpec sp, LseView lse, int64_t* __restrict__ col, float* __restrict__ part) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t s, grp, h;
  if (!stage_item(sp.plan, kMapUnits, sp.H, blockIdx.x, s, grp, h)) return;
  int64_t t0, n;
  sp.plan.segment(s, t0, n);
  const MapSplit m = map_split(n);
  const int64_t kb0 = grp * m.kpg, kb1 = min64(m.nkb, kb0 + m.kpg);
  lse.s0 = t0;
  float* rows0 = part != nullptr ? part + sp.plan.arr(kPartFloats)[s] + (2 * grp * sp.H + h) * n : nullptr;
  prob_map_keys<T>(head_rows<T>(sp.q, sp.q_vec, h, t0), head_rows<T>(sp.k, sp.k_vec, h, t0), n, kb0, kb1,
                   lse.row(0, h), sp.tg, sp.c2, col + t0, rows0, sp.H * n, smem);
}

// row[t] = sum_h fx(row mean of token t over its segment), from the partials _varlen_prob_map_kernel left.
__global__ void __launch_bounds__(kRowThreads)
    _varlen_row_finish_kernel(const float* __restrict__ part, Plan plan, int64_t H, int64_t T, int64_t* __restrict__ row) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T || plan.invalid()) return;
  const int64_t s = last_at_most(plan.arr(kBounds), plan.S, t);  // non-empty: bounds[s] <= t < bounds[s + 1]
  int64_t t0, n;
  plan.segment(s, t0, n);
  row[t] = row_sum_fx(part + plan.arr(kPartFloats)[s], 2 * map_split(n).groups, H * n, n, H, n, t - t0);
}

// ---------------------------------------------------------------------------------------------
// The focal choice per segment and the group sums
// ---------------------------------------------------------------------------------------------

// parts (C, T): row 0 the column sums, row 1 (C = 2, focal) the row sums. sig (T / group,). CTAs stride
// over the segments; an invalid plan fills sig with INT64_MIN instead (grid-stride).
__global__ void __launch_bounds__(kChooseThreads)
    _varlen_choose_kernel(const int64_t* __restrict__ parts, int64_t C, Plan plan, int64_t T, int64_t group,
                          int64_t* __restrict__ sig) {
  __shared__ SelectShared sh;
  if (plan.invalid()) {
    const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < T / group; u += step) {
      sig[u] = INT64_MIN;
    }
    return;
  }
  for (int64_t s = blockIdx.x; s < plan.S; s += gridDim.x) {  // uniform across the CTA
    int64_t t0, n;
    plan.segment(s, t0, n);
    if (n == 0) continue;
    const int64_t* src = parts + t0;
    if (C == 2) {
      const int64_t* row = parts + T + t0;
      FocalSums c{}, r{};
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        c.add(src[j]);
        r.add(row[j]);
      }
      c = block_focal_sum(c, sh);
      r = block_focal_sum(r, sh);
      if (!focal_use_col(c, r, n)) src = row;
    }
    for (int64_t u = threadIdx.x; u < n / group; u += blockDim.x) {
      ull acc = 0;  // unsigned: wraps like torch's int64 sum (in range by the size limit anyway)
      for (int64_t x = 0; x < group; ++x) acc += static_cast<ull>(src[u * group + x]);
      sig[t0 / group + u] = static_cast<int64_t>(acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Bounds on each stage's item count from T and S alone (the plan's totals never exceed them): a unit
// holds at least one token and each segment at most one partial unit; map groups per segment are at
// most min(kMapGroups, key blocks).
struct StageBounds {
  int64_t lse_units, map_units, dot_units, part_floats;
};

StageBounds stage_bounds(const QkVarlenArgs& a, int64_t dot_rows) {
  StageBounds b{};
  b.lse_units = std::min(a.T, ceil_div(a.T, kTile) + a.S);
  b.map_units = std::min(kMapGroups * a.S, b.lse_units);
  b.dot_units = std::min(a.T, ceil_div(a.T, dot_rows) + a.S);
  b.part_floats = 2 * a.H * a.T * std::min<int64_t>(kMapGroups, ceil_div(a.T, kTile));
  return b;
}

unsigned grid_size(int64_t blocks) {
  TORCH_CHECK(blocks <= INT_MAX, "fopru: q/k too large for one launch (", blocks, " CTAs)");
  return static_cast<unsigned>(blocks);
}

// Rows per CTA of _varlen_dot_kernel: the smaller of its jobs' (as the dense launcher's largest cpi).
int64_t dot_rows_of_jobs(const QkVarlenArgs& a, bool q_vec, bool k_vec, int64_t es) {
  const int64_t rows = dot_rows_per_cta(a.d, k_vec, es);
  return a.received ? rows : std::min(rows, dot_rows_per_cta(a.d, q_vec, es));
}

// The plan of cu_seqlens into plan_ws, then (T > 0) the parts (C, T) into `parts`: row 0 col[t], row 1
// (focal) row[t], each sum_h fx(mean of segment t's probabilities or logits).
template <typename T>
void packed_parts(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                  const std::optional<at::Tensor>& lse, const QkVarlenArgs& a, const Plan& plan, int64_t* parts,
                  const Ctx& ctx) {
  constexpr int64_t es = sizeof(T);
  const MatView qv{q.data_ptr(), 0, a.q_sh, a.q_st, a.q_sd};
  const MatView kv{k.data_ptr(), 0, a.k_sh, a.k_st, a.k_sd};
  const bool q_vec = rows_vectorizable(qv, es, a.d, 1, a.H), k_vec = rows_vectorizable(kv, es, a.d, 1, a.H);
  const bool focal = !a.received;
  const int64_t dot_rows = dot_rows_of_jobs(a, q_vec, k_vec, es);

  PlanSpec ps{cu_seqlens.const_data_ptr(), cu_seqlens.stride(0), cu_seqlens.scalar_type() == at::kLong,
              a.T, a.H, a.group, dot_rows, plan};
  _varlen_plan_kernel<<<1, kPlanThreads, 0, ctx.stream>>>(ps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.T == 0 || a.S == 0) return;  // nothing to score, or (S = 0 < T) an invalid cu_seqlens the flag reports
  const StageBounds bounds = stage_bounds(a, dot_rows);

  if (!a.prob) {  // logit means by the closed forms: u = qsum (columns), ksum (rows)
    const at::Tensor sums = at::empty({focal ? 2 : 1, a.S, a.H, a.d}, ctx.opts.dtype(at::kFloat));
    float* su = sums.mutable_data_ptr<float>();
    const dim3 sum_grid(grid_size(a.S * a.H), focal ? 2u : 1u);
    _varlen_patch_sum_kernel<T><<<sum_grid, kSumThreads, 0, ctx.stream>>>(SumJob{qv, q_vec}, SumJob{kv, k_vec}, plan,
                                                                          a.H, a.d, su);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    DotSpec sp{};
    sp.H = a.H;
    sp.d = a.d;
    sp.hc = dot_heads_per_pass(a.H, a.d);
    const DotJob cj{kv, 0, k_vec, MatView{su, a.H * a.d, a.d, 0, 1}, true, parts, 0};
    const DotJob rj{qv, 0, q_vec, MatView{su + a.S * a.H * a.d, a.H * a.d, a.d, 0, 1}, true, parts + a.T, 0};
    const dim3 dot_grid(grid_size(bounds.dot_units), focal ? 2u : 1u);
    _varlen_dot_kernel<T><<<dot_grid, kDotThreads, dot_smem_bytes(sp), ctx.stream>>>(cj, focal ? rj : cj, sp, plan,
                                                                                     a.scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  const TileGeom tg = tile_geom(a.d, es);
  const TilesSpec ts{qv, kv, q_vec, k_vec, a.H, a.T, tg, static_cast<float>(a.scale * kLog2e), plan};
  at::Tensor lse_ws;  // freed after the launches: the caching allocator orders its reuse on this stream
  LseView lv{};
  if (a.has_lse) {
    lv = LseView{lse->const_data_ptr<float>(), 0, a.lse_sh, a.lse_st, 0, static_cast<float>(kLog2e)};
  } else {
    lse_ws = at::empty({a.H, a.T}, ctx.opts.dtype(at::kFloat));
    float* out = lse_ws.mutable_data_ptr<float>();
    allow_tile_smem<_varlen_lse_kernel<T>>(kOp, tg, ctx);
    _varlen_lse_kernel<T><<<grid_size(a.H * bounds.lse_units), kMapThreads, tg.bytes, ctx.stream>>>(ts, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    lv = LseView{out, 0, a.T, 1, 0, 1.0f};
  }
  C10_CUDA_CHECK(cudaMemsetAsync(parts, 0, static_cast<size_t>(a.T) * sizeof(int64_t), ctx.stream));
  at::Tensor part;
  if (focal) part = at::empty({bounds.part_floats}, ctx.opts.dtype(at::kFloat));
  float* pp = focal ? part.mutable_data_ptr<float>() : nullptr;
  allow_tile_smem<_varlen_prob_map_kernel<T>>(kOp, tg, ctx);
  _varlen_prob_map_kernel<T><<<grid_size(a.H * bounds.map_units), kMapThreads, tg.bytes, ctx.stream>>>(ts, lv, parts,
                                                                                                      pp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (focal) {
    _varlen_row_finish_kernel<<<grid_size(ceil_div(a.T, kRowThreads)), kRowThreads, 0, ctx.stream>>>(pp, plan, a.H,
                                                                                                    a.T, parts + a.T);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The plan (returned: its first word is the invalid flag) and, for T > 0, sig (T / group,) into `sig`.
at::Tensor packed_significance(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                               const std::optional<at::Tensor>& lse, const QkVarlenArgs& a, int64_t* sig) {
  TORCH_CHECK(a.T <= kMaxTokens, "fopru: T = ", a.T, " tokens exceeds the CUDA kernels' limit of ", kMaxTokens);
  const Ctx ctx = make_ctx(q, kQkSmemReserve);
  at::Tensor plan_ws = at::empty({Plan::words(a.S)}, ctx.opts.dtype(at::kLong));
  const Plan plan{plan_ws.mutable_data_ptr<int64_t>(), a.S};
  const int64_t C = a.received ? 1 : 2;
  const at::Tensor parts = at::empty({C * a.T}, ctx.opts.dtype(at::kLong));
  dispatch_qk(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    packed_parts<T>(q, k, cu_seqlens, lse, a, plan, parts.mutable_data_ptr<int64_t>(), ctx);
  });
  if (a.T == 0) return plan_ws;
  _varlen_choose_kernel<<<grid_size(std::max<int64_t>(a.S, 1)), kChooseThreads, 0, ctx.stream>>>(
      parts.const_data_ptr<int64_t>(), C, plan, a.T, a.group, sig);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plan_ws;
}

std::string_view view(c10::string_view s) { return std::string_view(s.data(), s.size()); }

}  // namespace

at::Tensor significance_qk_varlen_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                       c10::string_view score, std::optional<double> scale,
                                       const std::optional<at::Tensor>& lse, c10::string_view kind, int64_t group) {
  const QkVarlenArgs a = check_significance_qk_varlen(q, k, cu_seqlens, view(score), scale, lse, view(kind), group);
  check_head_dim(kOp, a.d);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor sig = at::empty({a.T / a.group}, q.options().dtype(at::kLong));
  if (a.T > 0) packed_significance(q, k, cu_seqlens, lse, a, sig.mutable_data_ptr<int64_t>());
  return sig;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_tokens_qk_varlen_cuda(
    const at::Tensor& tokens, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
    at::IntArrayRef keep, c10::string_view strategy, c10::string_view score, std::optional<double> scale,
    const std::optional<at::Tensor>& lse, c10::string_view kind, int64_t group,
    const std::optional<at::Tensor>& cu_seqlens_select, at::OptionalIntArrayRef grids) {
  const PruneQkVarlenArgs p = check_prune_qk_varlen(tokens, q, k, cu_seqlens, keep, view(strategy), view(score), scale,
                                                    lse, view(kind), group, cu_seqlens_select, grids);
  check_head_dim(kOp, p.qk.d);
  const c10::cuda::CUDAGuard guard(tokens.device());
  at::Tensor sig = at::empty({p.qk.T / p.qk.group}, q.options().dtype(at::kLong));
  at::Tensor plan;  // its flag marks every selection segment invalid when cu_seqlens was; alive past the launches
  if (p.sel.total > 0) plan = packed_significance(q, k, cu_seqlens, lse, p.qk, sig.mutable_data_ptr<int64_t>());
  const int64_t* invalid = plan.defined() ? plan.const_data_ptr<int64_t>() : nullptr;
  // SPEC.md: prune_tokens_varlen on sig over the selection segments (cu_seqlens / group when None).
  return cu_seqlens_select.has_value() ? prune_segments_cuda(tokens, sig, *cu_seqlens_select, 1, grids, invalid, p.sel)
                                       : prune_segments_cuda(tokens, sig, cu_seqlens, group, grids, invalid, p.sel);
}

}  // namespace fopru

TORCH_LIBRARY_IMPL(fopru, CUDA, m) {
  m.impl("significance_qk_varlen", &fopru::significance_qk_varlen_cuda);
  m.impl("prune_tokens_qk_varlen", &fopru::prune_tokens_qk_varlen_cuda);
}
