// The full attention map's side of the CUDA prune_tokens path (cuda/prune_tokens.cu): reading
// attention values as SPEC.md's fixed point, and _reduce_map_kernel, the column and row sums of the
// patch block of a (B, H, S, S) map behind significance / prune_tokens with score received / focal.
// Included by prune_tokens.cu only; a header so that that file stays the ops' launch plan.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "fopru.h"
#include "ops.h"

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

// ---------------------------------------------------------------------------------------------
// _reduce_map_kernel
// ---------------------------------------------------------------------------------------------

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

}  // namespace
}  // namespace fopru
