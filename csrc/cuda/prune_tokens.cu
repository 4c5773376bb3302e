// CUDA kernels of fopru::significance / select / prune_tokens (SPEC.md), registered for the CUDA key.
//
// Launch plan:
//   cls               one launch of _select_gather_kernel: each CTA of an image rebuilds the
//                     significance from the CLS row (H x N values, L2-resident) in shared memory,
//                     selects, and gathers its own chunk of the kept rows.
//   received / focal  memset + _reduce_map_kernel (column and row sums of the full map, int64
//                     atomics, spread over (image, head, row tile, column tile)) + the same
//                     _select_gather_kernel, which makes the focal choice before selecting.
//   keys too large for shared memory (or FOPRU_CUDA_FORCE_GLOBAL_KEYS=1, a test hook): the keys of
//                     each image are built once by _build_keys_kernel into a global workspace and
//                     the selection reads them from L2.
// Selection (select.cuh) is threshold-then-compact: radix select of the K-th largest key, then a
// block scan that ranks the kept items in index order, so the indices come out ascending.
// Every sum is an int64 fixed-point sum (exact in any order), and the focal choice compares exact
// integers (fopru.h), so every CTA of an image makes the same choice.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "fopru.h"
#include "ops.h"
#include "select.cuh"
#include "stages.h"

namespace fopru {
namespace {

constexpr int kReduceThreads = 256;  // full-map reduction CTAs (upper bound)
constexpr int kReduceRows = 4;       // map rows each thread has in flight
constexpr int kScalarCols = 4;       // columns per thread when map rows cannot be read as 16 B vectors
constexpr int64_t kMaxTileRows = 1024;  // map rows per reduction CTA (shared row partials)

// ---------------------------------------------------------------------------------------------
// Element access
// ---------------------------------------------------------------------------------------------

enum AttnDtype : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

// fx of one stored attention value; half and bfloat16 widen to float exactly (SPEC.md).
template <int DT>
struct AttnElem;
template <>
struct AttnElem<kF16> {
  using Raw = uint16_t;
  static __device__ __forceinline__ int64_t fxv(Raw r) { return fx(__half2float(__ushort_as_half(r))); }
};
template <>
struct AttnElem<kBF16> {
  using Raw = uint16_t;
  static __device__ __forceinline__ int64_t fxv(Raw r) {
    return fx(__uint_as_float(static_cast<uint32_t>(r) << 16));
  }
};
template <>
struct AttnElem<kF32> {
  using Raw = float;
  static __device__ __forceinline__ int64_t fxv(Raw r) { return fx(r); }
};
template <>
struct AttnElem<kF64> {
  using Raw = double;
  static __device__ __forceinline__ int64_t fxv(Raw r) { return fx(r); }
};

// x from lane (this lane ^ o): FocalSums in 64-bit pieces, as shuffles move at most 64 bits.
__device__ __forceinline__ FocalSums shfl_xor_focal(const FocalSums& s, int o) {
  auto shfl = [o](u128 v) {
    const ull lo = __shfl_xor_sync(kFullMask, static_cast<ull>(v), o);
    const ull hi = __shfl_xor_sync(kFullMask, static_cast<ull>(v >> 64), o);
    return (static_cast<u128>(hi) << 64) | lo;
  };
  FocalSums t;
  t.sq = shfl(s.sq);
  t.sq_hi = __shfl_xor_sync(kFullMask, static_cast<ull>(s.sq_hi), o);
  t.sum = static_cast<i128>(shfl(static_cast<u128>(s.sum)));
  return t;
}

// The focal rule's exact sums over the block (kSelectThreads threads, all call): warps merge by
// shuffles, then every thread merges the warps' partials (integers: any order gives the same).
__device__ FocalSums block_focal_sum(FocalSums s, SelectShared& sh) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) s.merge(shfl_xor_focal(s, o));
  if (lane_id() == 0) sh.focal[warp_id()] = s;
  __syncthreads();
  FocalSums total{};
  for (int w = 0; w < num_warps(); ++w) total.merge(sh.focal[w]);
  __syncthreads();  // sh.focal is reused by the next call
  return total;
}

// ---------------------------------------------------------------------------------------------
// Keys: the significance of one image, and for `row` the row scores
// ---------------------------------------------------------------------------------------------

enum class Src : int { kCls = 0, kSig = 1, kFocal = 2 };

struct SigSource {
  Src mode;
  // kCls: attn[b, h, 0, P + j] at attn + b * a_sb + h * a_sh + (P + j) * a_ss (elements)
  const void* attn;
  int64_t a_sb, a_sh, a_ss, H, P;
  // kSig: sig[b, j] at sig + b * sig_sb + j * sig_sn. kFocal: the column sums there and the row
  // sums at row + b * sig_sb + j * sig_sn.
  const int64_t* sig;
  const int64_t* row;
  int64_t sig_sb, sig_sn;
};

struct SelectSpec {
  int64_t N, K;
  bool by_row;      // strategy row: the items are the grid rows
  int64_t W, rows;  // W = cols for row, 1 for rank; rows = N / W
  int64_t kc, cpi;  // kept tokens per CTA, CTAs per image
};

// Writes the significance of image b to sig_dst[0, N) and, if rows_dst, the row scores to
// rows_dst[0, rows). sig_dst may be null for kSig only (row scores then read the source).
template <int DT>
__device__ void build_keys(const SigSource& src, const SelectSpec& sel, int64_t b, int64_t* sig_dst,
                           int64_t* rows_dst, SelectShared& sh) {
  const int64_t n = sel.N;
  const int64_t* sig_src = src.sig + b * src.sig_sb;
  if (src.mode == Src::kCls) {
    using Raw = typename AttnElem<DT>::Raw;
    const Raw* a = static_cast<const Raw*>(src.attn) + b * src.a_sb + src.P * src.a_ss;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const Raw* p = a + j * src.a_ss;
      int64_t s = 0;
#pragma unroll 8  // independent loads in flight
      for (int64_t h = 0; h < src.H; ++h) s += AttnElem<DT>::fxv(p[h * src.a_sh]);
      sig_dst[j] = s;
    }
  } else if (src.mode == Src::kFocal) {
    const int64_t* col = sig_src;
    const int64_t* row = src.row + b * src.sig_sb;
    const int64_t st = src.sig_sn;
    FocalSums c{}, r{};
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      c.add(col[j * st]);
      r.add(row[j * st]);
    }
    c = block_focal_sum(c, sh);
    r = block_focal_sum(r, sh);
    const int64_t* chosen = focal_use_col(c, r, n) ? col : row;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sig_dst[j] = chosen[j * st];
  } else if (sig_dst != nullptr) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sig_dst[j] = sig_src[j * src.sig_sn];
  }
  if (rows_dst != nullptr) {
    __syncthreads();
    const int64_t* s = sig_dst != nullptr ? sig_dst : sig_src;
    const int64_t st = sig_dst != nullptr ? 1 : src.sig_sn;
    for (int64_t y = warp_id(); y < sel.rows; y += num_warps()) {
      ull acc = 0;  // unsigned: wraps like torch's int64 sum on out-of-spec user input
      for (int64_t x = lane_id(); x < sel.W; x += kWarp) acc += static_cast<ull>(s[(y * sel.W + x) * st]);
      acc = warp_sum(acc);
      if (lane_id() == 0) rows_dst[y] = static_cast<int64_t>(acc);
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// One CTA per (image, chunk of kc kept tokens): keys (built here in shared memory when gitems is
// null, else read from gitems), selection, idx[b, chunk] and the gather of the chunk's rows.
// Dynamic shared memory: [sig: N int64][row scores: rows int64, row only] (shared keys only)
// followed by [slots: kc / W + 2 int32].
template <int DT>
__global__ void __launch_bounds__(kSelectThreads)
    _select_gather_kernel(SigSource src, SelectSpec sel, GatherSpec g, const int64_t* gitems,
                          int64_t gitems_sb, int64_t gitems_si, int64_t* __restrict__ idx) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ SelectShared sh;
  const int64_t b = blockIdx.x / sel.cpi;
  const int64_t chunk = blockIdx.x - b * sel.cpi;
  const int64_t m = sel.by_row ? sel.rows : sel.N;
  Items items;
  int32_t* slots;
  if (gitems == nullptr) {  // uniform branch
    int64_t* s_sig = reinterpret_cast<int64_t*>(smem);
    int64_t* s_rows = sel.by_row ? s_sig + sel.N : nullptr;
    build_keys<DT>(src, sel, b, s_sig, s_rows, sh);
    items = Items{sel.by_row ? s_rows : s_sig, 1};
    slots = reinterpret_cast<int32_t*>(s_sig + sel.N + (sel.by_row ? sel.rows : 0));
  } else {
    items = Items{gitems + b * gitems_sb, gitems_si};
    slots = reinterpret_cast<int32_t*>(smem);
  }
  const int64_t k0 = chunk * sel.kc;  // < K: cpi = ceil(K / kc)
  const int64_t k1 = min64(k0 + sel.kc, sel.K);
  const int64_t p0 = k0 / sel.W, p1 = (k1 - 1) / sel.W;  // kept items (ranks) this chunk covers
  uint64_t threshold;
  int64_t need;
  radix_select(items, m, sel.K / sel.W, threshold, need, sh);
  compact(items, m, threshold, need, p0, p1, slots, sh);
  __syncthreads();
  for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) idx[b * sel.K + k] = token_at(k, slots, p0, sel.W);
  switch (g.unit) {
    case 16: gather_rows<uint4>(g, b, k0, k1, sel.K, slots, p0, sel.W); break;
    case 8: gather_rows<uint2>(g, b, k0, k1, sel.K, slots, p0, sel.W); break;
    case 4: gather_rows<unsigned>(g, b, k0, k1, sel.K, slots, p0, sel.W); break;
    case 2: gather_rows<unsigned short>(g, b, k0, k1, sel.K, slots, p0, sel.W); break;
    default: break;
  }
}

// One CTA per image: the keys into global memory (the significance op's output, or the workspace
// of the selection when the keys do not fit in shared memory).
template <int DT>
__global__ void __launch_bounds__(kSelectThreads)
    _build_keys_kernel(SigSource src, SelectSpec sel, int64_t* sig_out, int64_t* rows_out, int64_t out_sb) {
  __shared__ SelectShared sh;
  const int64_t b = blockIdx.x;
  build_keys<DT>(src, sel, b, sig_out != nullptr ? sig_out + b * out_sb : nullptr,
                 rows_out != nullptr ? rows_out + b * out_sb : nullptr, sh);
}

struct MapView {
  const void* ptr;
  int64_t sb, sh, sq, ss;  // element strides of attn (B, H, S, S)
  int64_t H, P, S, N;
};

struct MapTiling {
  int64_t cbase;     // first column of column tile 0 (P, or P rounded down to the vector width)
  int cols_threads;  // threads across the columns of a tile (multiple of 32)
  int64_t col_tiles, row_tiles, tile_rows;
};

// Loads this thread's kW columns c0 + e * cstep of one map row; columns outside [P, S) read as 0.
template <typename Raw, int kW, bool kVec>
__device__ __forceinline__ void load_cols(const Raw* rowp, int64_t c0, int64_t cstep, const MapView& m,
                                          Raw (&v)[kW]) {
  if (kVec && c0 + kW <= m.S) {  // aligned 16 B vector inside the row (prefix columns masked later)
    union {
      uint4 q;
      Raw r[kW];
    } u;
    u.q = *reinterpret_cast<const uint4*>(rowp + c0);
#pragma unroll
    for (int e = 0; e < kW; ++e) v[e] = u.r[e];
  } else {
#pragma unroll
    for (int e = 0; e < kW; ++e) {
      const int64_t c = c0 + e * cstep;
      v[e] = (c >= m.P && c < m.S) ? rowp[c * m.ss] : Raw(0);
    }
  }
}

// Column sums col[b, j] = sum_h sum_i fx(attn[b, h, P + i, P + j]) and, if row is not null, row
// sums row[b, i] = sum_h sum_j fx(...), accumulated with int64 atomics into zeroed buffers at
// col + b * ws_sb and row + b * ws_sb. One CTA per (image, head, row tile, column tile); thread
// (tr, tc) owns kW columns of the tile and every tr_count-th row of the tile. kVec: columns in
// 16 B vectors (contiguous rows with 16 B-aligned starts), else kScalarCols strided columns.
template <int DT, bool kVec>
__global__ void __launch_bounds__(kReduceThreads)
    _reduce_map_kernel(MapView m, MapTiling t, int64_t* __restrict__ col, int64_t* __restrict__ row, int64_t ws_sb) {
  using Raw = typename AttnElem<DT>::Raw;
  constexpr int kW = kVec ? static_cast<int>(16 / sizeof(Raw)) : kScalarCols;
  __shared__ ull s_row[kMaxTileRows];
  const int tc = static_cast<int>(threadIdx.x) % t.cols_threads;
  const int tr = static_cast<int>(threadIdx.x) / t.cols_threads;  // whole warps share a tr
  const int tr_count = static_cast<int>(blockDim.x) / t.cols_threads;
  int64_t bid = blockIdx.x;
  const int64_t ct = bid % t.col_tiles;
  bid /= t.col_tiles;
  const int64_t rt = bid % t.row_tiles;
  bid /= t.row_tiles;
  const int64_t h = bid % m.H;
  const int64_t b = bid / m.H;
  const int64_t i_begin = rt * t.tile_rows;
  const int64_t i_end = min64(i_begin + t.tile_rows, m.N);
  const bool want_rows = row != nullptr;
  if (want_rows) {
    for (int64_t r = threadIdx.x; r < i_end - i_begin; r += blockDim.x) s_row[r] = 0;
  }
  __syncthreads();

  const int64_t c0 = kVec ? t.cbase + (ct * t.cols_threads + tc) * kW
                          : t.cbase + ct * t.cols_threads * kW + tc;
  const int64_t cstep = kVec ? 1 : t.cols_threads;
  const Raw* base = static_cast<const Raw*>(m.ptr) + b * m.sb + h * m.sh;
  long long acc[kW];
#pragma unroll
  for (int e = 0; e < kW; ++e) acc[e] = 0;

  for (int64_t i0 = i_begin + tr; i0 < i_end; i0 += static_cast<int64_t>(tr_count) * kReduceRows) {
    Raw v[kReduceRows][kW];
#pragma unroll
    for (int u = 0; u < kReduceRows; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * tr_count;
      if (i < i_end) {
        load_cols<Raw, kW, kVec>(base + (m.P + i) * m.sq, c0, cstep, m, v[u]);
      } else {
#pragma unroll
        for (int e = 0; e < kW; ++e) v[u][e] = Raw(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kReduceRows; ++u) {
      long long rs = 0;
#pragma unroll
      for (int e = 0; e < kW; ++e) {
        const int64_t c = c0 + e * cstep;
        const long long f = (c >= m.P && c < m.S) ? static_cast<long long>(AttnElem<DT>::fxv(v[u][e])) : 0ll;
        acc[e] += f;
        rs += f;
      }
      if (want_rows) {  // uniform per warp: the whole warp shares tr, hence i
        rs = warp_sum(rs);
        const int64_t i = i0 + static_cast<int64_t>(u) * tr_count;
        if (lane_id() == 0 && i < i_end && rs != 0) atomicAdd(&s_row[i - i_begin], static_cast<ull>(rs));
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kW; ++e) {
    const int64_t c = c0 + e * cstep;
    if (c >= m.P && c < m.S && acc[e] != 0) {
      atomicAdd(reinterpret_cast<ull*>(col + b * ws_sb + (c - m.P)), static_cast<ull>(acc[e]));
    }
  }
  if (want_rows) {
    __syncthreads();
    for (int64_t r = threadIdx.x; r < i_end - i_begin; r += blockDim.x) {
      if (s_row[r] != 0) atomicAdd(reinterpret_cast<ull*>(row + b * ws_sb + i_begin + r), s_row[r]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

template <typename F>
void dispatch_attn(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kHalf: f(std::integral_constant<int, kF16>{}); break;
    case at::kBFloat16: f(std::integral_constant<int, kBF16>{}); break;
    case at::kFloat: f(std::integral_constant<int, kF32>{}); break;
    case at::kDouble: f(std::integral_constant<int, kF64>{}); break;
    default: TORCH_CHECK(false, "fopru: unexpected attn dtype ", t);
  }
}

SigSource cls_source(const at::Tensor& attn, const SigArgs& a) {
  SigSource s{};
  s.mode = Src::kCls;
  s.attn = attn.data_ptr();
  s.a_sb = attn.stride(0);
  s.a_sh = attn.stride(1);
  s.a_ss = attn.stride(3);
  s.H = a.H;
  s.P = a.P;
  return s;
}

SigSource sig_source(Src mode, const int64_t* sig, const int64_t* row, int64_t sb, int64_t sn) {
  SigSource s{};
  s.mode = mode;
  s.sig = sig;
  s.row = row;
  s.sig_sb = sb;
  s.sig_sn = sn;
  return s;
}

SelectSpec select_spec(int64_t n, int64_t keep, const SelectArgs& s) {
  SelectSpec sel{};
  sel.N = n;
  sel.K = keep;
  sel.by_row = s.strategy == Strategy::kRow;
  sel.W = sel.by_row ? s.cols : 1;
  sel.rows = sel.by_row ? s.rows : n;
  return sel;
}

// Column (and, for focal, row) sums of the full map into zeroed int64 buffers.
template <int DT>
void launch_reduce(const at::Tensor& attn, const SigArgs& a, int64_t* col, int64_t* row, int64_t ws_sb,
                   const Ctx& ctx) {
  using Raw = typename AttnElem<DT>::Raw;
  const MapView m{attn.data_ptr(), attn.stride(0), attn.stride(1), attn.stride(2), attn.stride(3),
                  a.H, a.P, a.S, a.N};
  const int64_t vw = 16 / static_cast<int64_t>(sizeof(Raw));
  auto aligned = [vw](int64_t stride, int64_t size) { return size <= 1 || stride % vw == 0; };
  const bool vec = m.ss == 1 && reinterpret_cast<uintptr_t>(m.ptr) % 16 == 0 && aligned(m.sb, a.B) &&
                   aligned(m.sh, a.H) && m.sq % vw == 0;
  const int64_t w = vec ? vw : kScalarCols;
  MapTiling t{};
  t.cbase = vec ? a.P / w * w : a.P;
  const int64_t slots = ceil_div(a.S - t.cbase, w);
  t.cols_threads = static_cast<int>(std::min<int64_t>(kReduceThreads, ceil_div(slots, kWarp) * kWarp));
  const int threads = kReduceThreads / t.cols_threads * t.cols_threads;
  t.col_tiles = ceil_div(slots, t.cols_threads);
  const int64_t units = a.B * a.H * t.col_tiles;
  if (units == 0) return;
  const int64_t want_row_tiles = ceil_div(4 * static_cast<int64_t>(ctx.sms), units);
  t.tile_rows = std::min<int64_t>(kMaxTileRows, std::max<int64_t>(32, ceil_div(a.N, want_row_tiles)));
  t.row_tiles = ceil_div(a.N, t.tile_rows);
  const int64_t blocks = units * t.row_tiles;
  TORCH_CHECK(blocks <= INT_MAX, "fopru: attn too large for one launch (", blocks, " CTAs)");
  if (vec) {
    _reduce_map_kernel<DT, true><<<static_cast<unsigned>(blocks), threads, 0, ctx.stream>>>(m, t, col, row, ws_sb);
  } else {
    _reduce_map_kernel<DT, false><<<static_cast<unsigned>(blocks), threads, 0, ctx.stream>>>(m, t, col, row, ws_sb);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Selection (and gather when g.unit != 0) of B images; idx is (B, K) contiguous, K > 0.
template <int DT>
void launch_select(const SigSource& src, SelectSpec sel, const GatherSpec& g, int64_t B, int64_t* idx,
                   const Ctx& ctx) {
  TORCH_CHECK(sel.N <= kMaxTokens, "fopru: N = ", sel.N, " tokens exceeds the CUDA kernels' limit of ", kMaxTokens);
  int64_t kc = sel.K;
  if (g.unit != 0) {  // enough CTAs for the gather, each with enough rows to be worth its selection
    kc = std::max({kMinGatherRows, ceil_div(kMinGatherBytes, std::max<int64_t>(g.row_bytes, 1)),
                   ceil_div(sel.K * B, 2 * static_cast<int64_t>(ctx.sms))});
  }
  kc = std::min({kc, sel.K, (kMaxSlots - 2) * sel.W});
  sel.kc = kc;
  sel.cpi = ceil_div(sel.K, kc);
  const int64_t blocks = B * sel.cpi;
  TORCH_CHECK(blocks <= INT_MAX, "fopru: too many images for one launch (", blocks, " CTAs)");
  const int64_t slot_bytes = 4 * (kc / sel.W + 2);
  const int64_t key_bytes = 8 * (sel.N + (sel.by_row ? sel.rows : 0));
  const auto kernel = _select_gather_kernel<DT>;

  if (!force_global_keys() && key_bytes + slot_bytes <= ctx.smem_limit) {
    allow_dynamic_smem(kernel, key_bytes + slot_bytes, ctx.smem_limit);
    kernel<<<static_cast<unsigned>(blocks), kSelectThreads, key_bytes + slot_bytes, ctx.stream>>>(
        src, sel, g, nullptr, 0, 0, idx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  // Global keys: built once per image (unless rank reads a given significance directly).
  const int64_t* items = src.sig;
  int64_t items_sb = src.sig_sb, items_si = src.sig_sn;
  at::Tensor ws;  // freed after the launches: the caching allocator orders its reuse on this stream
  if (src.mode != Src::kSig || sel.by_row) {
    const int64_t sig_cols = src.mode == Src::kSig ? 0 : sel.N;
    const int64_t row_cols = sel.by_row ? sel.rows : 0;
    ws = at::empty({B, sig_cols + row_cols}, ctx.long_opts);
    int64_t* base = ws.mutable_data_ptr<int64_t>();
    int64_t* sig_out = sig_cols > 0 ? base : nullptr;
    int64_t* rows_out = row_cols > 0 ? base + sig_cols : nullptr;
    _build_keys_kernel<DT><<<static_cast<unsigned>(B), kSelectThreads, 0, ctx.stream>>>(
        src, sel, sig_out, rows_out, sig_cols + row_cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    items = sel.by_row ? rows_out : sig_out;
    items_sb = sig_cols + row_cols;
    items_si = 1;
  }
  allow_dynamic_smem(kernel, slot_bytes, ctx.smem_limit);
  kernel<<<static_cast<unsigned>(blocks), kSelectThreads, slot_bytes, ctx.stream>>>(src, sel, g, items, items_sb,
                                                                                      items_si, idx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor significance_cuda(const at::Tensor& attn, c10::string_view score, int64_t num_prefix) {
  const SigArgs a = check_significance(attn, std::string_view(score.data(), score.size()), num_prefix);
  const c10::cuda::CUDAGuard guard(attn.device());
  at::Tensor out = at::empty({a.B, a.N}, attn.options().dtype(at::kLong));
  if (a.B == 0) return out;
  const Ctx ctx = make_ctx(attn);
  int64_t* o = out.mutable_data_ptr<int64_t>();
  SelectSpec sel{};
  sel.N = a.N;
  dispatch_attn(attn.scalar_type(), [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    if (a.score == Score::kCls) {
      _build_keys_kernel<DT><<<static_cast<unsigned>(a.B), kSelectThreads, 0, ctx.stream>>>(
          cls_source(attn, a), sel, o, nullptr, a.N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (a.score == Score::kReceived) {
      C10_CUDA_CHECK(cudaMemsetAsync(o, 0, out.nbytes(), ctx.stream));
      launch_reduce<DT>(attn, a, o, nullptr, a.N, ctx);
    } else {
      at::Tensor ws = at::empty({a.B, 2, a.N}, ctx.long_opts);
      int64_t* w = ws.mutable_data_ptr<int64_t>();
      C10_CUDA_CHECK(cudaMemsetAsync(w, 0, ws.nbytes(), ctx.stream));
      launch_reduce<DT>(attn, a, w, w + a.N, 2 * a.N, ctx);
      _build_keys_kernel<DT><<<static_cast<unsigned>(a.B), kSelectThreads, 0, ctx.stream>>>(
          sig_source(Src::kFocal, w, w + a.N, 2 * a.N, 1), sel, o, nullptr, a.N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor select_cuda(const at::Tensor& sig, int64_t keep, c10::string_view strategy, at::OptionalIntArrayRef grid) {
  const SelectArgs s = check_select(sig, keep, std::string_view(strategy.data(), strategy.size()), grid);
  const c10::cuda::CUDAGuard guard(sig.device());
  at::Tensor idx = at::empty({s.B, keep}, sig.options());
  if (s.B == 0 || keep == 0) return idx;
  const Ctx ctx = make_ctx(sig);
  const SigSource src = sig_source(Src::kSig, sig.const_data_ptr<int64_t>(), nullptr, sig.stride(0), sig.stride(1));
  // The attn dtype only matters for cls keys; any instantiation serves a given significance.
  launch_select<kF32>(src, select_spec(s.N, keep, s), GatherSpec{}, s.B, idx.mutable_data_ptr<int64_t>(), ctx);
  return idx;
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_cuda(const at::Tensor& tokens, const at::Tensor& attn, int64_t keep,
                                                     c10::string_view strategy, c10::string_view score,
                                                     int64_t num_prefix, at::OptionalIntArrayRef grid) {
  const PruneArgs p = check_prune(tokens, attn, keep, std::string_view(strategy.data(), strategy.size()),
                                  std::string_view(score.data(), score.size()), num_prefix, grid);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t B = p.sig.B, N = p.sig.N;
  at::Tensor pruned = at::empty({B, keep, p.D}, tokens.options());
  at::Tensor idx = at::empty({B, keep}, tokens.options().dtype(at::kLong));
  if (B == 0 || keep == 0) return {pruned, idx};
  const Ctx ctx = make_ctx(tokens);
  const GatherSpec g = gather_spec(tokens, pruned);
  const SelectSpec sel = select_spec(N, keep, p.sel);
  int64_t* o = idx.mutable_data_ptr<int64_t>();
  dispatch_attn(attn.scalar_type(), [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    if (p.sig.score == Score::kCls) {
      launch_select<DT>(cls_source(attn, p.sig), sel, g, B, o, ctx);
      return;
    }
    const bool focal = p.sig.score == Score::kFocal;
    const int64_t ws_sb = focal ? 2 * N : N;
    at::Tensor ws = at::empty({B, ws_sb}, ctx.long_opts);
    int64_t* w = ws.mutable_data_ptr<int64_t>();
    C10_CUDA_CHECK(cudaMemsetAsync(w, 0, ws.nbytes(), ctx.stream));
    launch_reduce<DT>(attn, p.sig, w, focal ? w + N : nullptr, ws_sb, ctx);
    launch_select<DT>(sig_source(focal ? Src::kFocal : Src::kSig, w, focal ? w + N : nullptr, ws_sb, 1), sel, g, B,
                      o, ctx);
  });
  return {pruned, idx};
}

at::Tensor choose_significance_cuda(const at::Tensor& col, const at::Tensor& row) {
  if (!row.defined()) return col;
  const c10::cuda::CUDAGuard guard(col.device());
  const int64_t B = col.size(0), N = col.size(1);
  at::Tensor out = at::empty({B, N}, col.options());
  if (B == 0 || N == 0) return out;
  const Ctx ctx = make_ctx(col);
  SelectSpec sel{};
  sel.N = N;
  _build_keys_kernel<kF32><<<static_cast<unsigned>(B), kSelectThreads, 0, ctx.stream>>>(
      sig_source(Src::kFocal, col.const_data_ptr<int64_t>(), row.const_data_ptr<int64_t>(), col.stride(0), 1), sel,
      out.mutable_data_ptr<int64_t>(), nullptr, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> select_gather_cuda(const at::Tensor& tokens, const at::Tensor& col,
                                                      const at::Tensor& row, const SelectArgs& s) {
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t B = tokens.size(0), N = tokens.size(1), keep = s.keep;
  at::Tensor pruned = at::empty({B, keep, tokens.size(2)}, tokens.options());
  at::Tensor idx = at::empty({B, keep}, tokens.options().dtype(at::kLong));
  if (B == 0 || keep == 0) return {pruned, idx};
  const Ctx ctx = make_ctx(tokens);
  const bool focal = row.defined();
  TORCH_CHECK(col.stride(1) == 1 && (!focal || (row.stride(1) == 1 && row.stride(0) == col.stride(0))),
              "fopru: select_gather_cuda needs unit-stride sums with one image stride");
  const SigSource src = sig_source(focal ? Src::kFocal : Src::kSig, col.const_data_ptr<int64_t>(),
                                   focal ? row.const_data_ptr<int64_t>() : nullptr, col.stride(0), 1);
  launch_select<kF32>(src, select_spec(N, keep, s), gather_spec(tokens, pruned), B, idx.mutable_data_ptr<int64_t>(),
                      ctx);
  return {pruned, idx};
}

}  // namespace fopru

TORCH_LIBRARY_IMPL(fopru, CUDA, m) {
  m.impl("significance", &fopru::significance_cuda);
  m.impl("select", &fopru::select_cuda);
  m.impl("prune_tokens", &fopru::prune_tokens_cuda);
}
