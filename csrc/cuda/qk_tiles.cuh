// The q/k kernels' tile header (cuda/significance_qk.cu, and any segmented variant): element
// access to q, k and lse, the 64-row shared-memory tiles of q and k (cp.async loads, logits by raw
// mma.sync on tensor cores for 16-bit inputs and by FMAs for float32), and what the kernels compute
// on a tile of logits held in registers: the online logsumexp of its rows and the probability sums
// of its rows and columns. Everything is per (image, head) and takes base pointers and counts, so a
// kernel over cu_seqlens segments uses it as it is, with the segment's first row as the base.
// The CUDA-core row code (dots against one staged vector, patch sums) is in qk_rows.cuh.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string_view>
#include <type_traits>

#include "common.cuh"

namespace fopru {
namespace {

constexpr double kLog2e = 1.4426950408889634;
// Tiles: 64 queries x 64 keys, 4 warps (warp w owns rows 16 w .. 16 w + 15 of the lse tile; the map
// kernels arrange the warps 2 x 2 over 32 x 32 sub-tiles).
constexpr int kTile = 64;
constexpr int kMapThreads = 128;
// Static shared memory of the tile kernels and margin: make_ctx's smem_reserve for the q/k kernels.
constexpr int64_t kQkSmemReserve = 4096;

// ---------------------------------------------------------------------------------------------
// Element access
// ---------------------------------------------------------------------------------------------

// Element (b, h, s, e) of q or k at p + b * sb + h * sh + s * ss + e * sd (elements).
struct MatView {
  const void* p;
  int64_t sb, sh, ss, sd;
};

// lse2 of query i of one (image or segment, head): p[i * ss] * mult (mult as in LseView).
struct LseRow {
  const float* p;
  int64_t ss;
  float mult;
  __device__ __forceinline__ float at(int64_t i) const { return p[i * ss] * mult; }
};

// lse2 (base-2 logsumexp) of query i of (b, h): p[b * sb + h * sh + (s0 + i) * ss] * mult, where
// mult = log2(e) for a given natural-log lse and 1 for the workspace of _qk_lse_kernel.
struct LseView {
  const float* p;
  int64_t sb, sh, ss, s0;
  float mult;
  __device__ __forceinline__ float at(int64_t b, int64_t h, int64_t i) const {
    return p[b * sb + h * sh + (s0 + i) * ss] * mult;
  }
  // The rows of (b, h): row(b, h).at(i) reads what at(b, h, i) reads.
  __device__ __forceinline__ LseRow row(int64_t b, int64_t h) const {
    return LseRow{p + b * sb + h * sh + s0 * ss, ss, mult};
  }
};

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(float x) { return x; }

template <typename T>
__device__ __forceinline__ T zero_elem() {
  if constexpr (std::is_same_v<T, __half>) {
    return __ushort_as_half(0);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __ushort_as_bfloat16(0);
  } else {
    return 0.0f;
  }
}

// The two 16-bit elements of a 32-bit word, low half first (memory order), widened exactly.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  if constexpr (std::is_same_v<T, __half>) {
    return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16))));
  } else {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
}

// 2^x on the special-function unit (relative error ~2^-22; results below 2^-126 flush to zero,
// far below fx's resolution of 2^-28).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core tiles. Raw mma.sync (PTX m16n8k16) rather than nvcuda::wmma: its fragment layout is
// documented, so the per-row lse and the column / row sums work on the accumulator registers;
// WMMA's accumulator layout is unspecified and would force every logit tile through shared memory.
// Shared-memory tiles are 64 rows x ld elements, rows zero-padded from d to dpad (a multiple of 16);
// ld = dpad + 8 (16-bit) or dpad + 4 (float32) keeps the fragment loads free of bank conflicts and
// row starts 16-byte aligned for cp.async.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

// Rows [0, 64) of a tile: row r < valid from src + r * ss (elements e < d at stride sd), zero rows
// after. vec: 16-byte cp.async chunks (complete after cp_async_wait), else synchronous loads.
template <typename T>
__device__ void load_tile(T* dst, int ld, const T* src, int64_t ss, int64_t sd, int64_t valid, int d, bool vec) {
  if (vec) {
    constexpr int V = static_cast<int>(16 / sizeof(T));
    const int cpr = d / V;
    for (int idx = threadIdx.x; idx < kTile * cpr; idx += blockDim.x) {
      const int r = idx / cpr, c = idx - r * cpr;
      T* s = dst + r * ld + c * V;
      if (r < valid) {
        cp_async16(s, src + r * ss + c * V);
      } else {
        *reinterpret_cast<uint4*>(s) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < kTile * d; idx += blockDim.x) {
      const int r = idx / d, e = idx - r * d;
      dst[r * ld + e] = r < valid ? src[r * ss + e * sd] : zero_elem<T>();
    }
  }
}

// Columns [d, dpad) of `rows` tile rows; the loaders never write them, so once per kernel.
template <typename T>
__device__ void zero_pad(T* base, int rows, int ld, int d, int dpad) {
  const int w = dpad - d;
  for (int idx = threadIdx.x; idx < rows * w; idx += blockDim.x) {
    const int r = idx / w;
    base[r * ld + d + (idx - r * w)] = zero_elem<T>();
  }
}

__device__ __forceinline__ uint32_t lds32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Logits (unscaled dots) of a warp's (16 MT) x (8 NT) sub-tile: query rows r0 + ..., key rows
// c0 + ... With g = lane / 4, t = lane % 4, acc[mt][nt] holds (the mma accumulator layout)
//   [0] (r0 + 16 mt + g, c0 + 8 nt + 2 t)   [1] (same row, column + 1)
//   [2] (row + 8, c0 + 8 nt + 2 t)          [3] (row + 8, column + 1)
// float32 inputs take CUDA-core FMAs over e in order, with the same element ownership.
template <typename T, int MT, int NT>
__device__ __forceinline__ void warp_logits(const T* qs, const T* ks, int ld, int d, int dpad, int r0, int c0,
                                            float (&acc)[MT][NT][4]) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarp - 1);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    (void)dpad;
    for (int e = 0; e < d; ++e) {
      float qa[MT][2], kb[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        qa[mt][0] = qs[(r0 + 16 * mt + g) * ld + e];
        qa[mt][1] = qs[(r0 + 16 * mt + g + 8) * ld + e];
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        kb[nt][0] = ks[(c0 + 8 * nt + 2 * t) * ld + e];
        kb[nt][1] = ks[(c0 + 8 * nt + 2 * t + 1) * ld + e];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          acc[mt][nt][0] = fmaf(qa[mt][0], kb[nt][0], acc[mt][nt][0]);
          acc[mt][nt][1] = fmaf(qa[mt][0], kb[nt][1], acc[mt][nt][1]);
          acc[mt][nt][2] = fmaf(qa[mt][1], kb[nt][0], acc[mt][nt][2]);
          acc[mt][nt][3] = fmaf(qa[mt][1], kb[nt][1], acc[mt][nt][3]);
        }
      }
    }
  } else {
    (void)d;
    for (int k0 = 0; k0 < dpad; k0 += 16) {
      uint32_t a[MT][4], bf[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const T* p = qs + (r0 + 16 * mt + g) * ld + k0 + 2 * t;
        a[mt][0] = lds32(p);
        a[mt][1] = lds32(p + 8 * ld);
        a[mt][2] = lds32(p + 8);
        a[mt][3] = lds32(p + 8 * ld + 8);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const T* p = ks + (c0 + 8 * nt + g) * ld + k0 + 2 * t;
        bf[nt][0] = lds32(p);
        bf[nt][1] = lds32(p + 8);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[mt][nt], a[mt], bf[nt]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row and column statistics of a logit tile in the mma accumulator layout (see warp_logits)
// ---------------------------------------------------------------------------------------------

// Online base-2 logsumexp (FlashAttention's forward pass) of a warp's 16 query rows over one tile of
// 64 keys: acc holds their logits (warp_logits<T, 1, 8>) for keys j0 + column, of which those below
// S exist; t = lane % 4; c2 = scale * log2(e). Lane (g, t) keeps the running (max, sum) of rows g ([0]) and
// g + 8 ([1]) over its own 16 columns; lse_merge_row merges the four lanes of a row at the end.
__device__ __forceinline__ void lse_tile_update(const float (&acc)[1][8][4], int64_t j0, int64_t S, int t, float c2,
                                                float (&m)[2], float (&s)[2]) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float x[16];
    float tmax = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const bool valid = j0 + 8 * nt + 2 * t + c < S;
        const float v = valid ? acc[0][nt][2 * hr + c] * c2 : -INFINITY;
        x[2 * nt + c] = v;
        tmax = fmaxf(tmax, v);
      }
    }
    const float mnew = fmaxf(m[hr], tmax);
    const float base = mnew == -INFINITY ? 0.0f : mnew;  // no (-inf) - (-inf)
    float sum = 0.0f;
#pragma unroll
    for (int e = 0; e < 16; ++e) sum += ex2(x[e] - base);
    s[hr] = s[hr] * ex2(m[hr] - base) + sum;
    m[hr] = mnew;
  }
}

// Merges the running (max, sum) of one row over the four lanes that hold it (lanes 4 g .. 4 g + 3);
// log2 of the row's sum of 2^logit is then m + log2f(s). Each pair of lanes adds the same two
// terms, so the four lanes end equal.
__device__ __forceinline__ void lse_merge_row(float& m, float& s) {
  for (int o = 1; o <= 2; o <<= 1) {
    const float mo = __shfl_xor_sync(kFullMask, m, o);
    const float so = __shfl_xor_sync(kFullMask, s, o);
    const float mn = fmaxf(m, mo);
    const float base = mn == -INFINITY ? 0.0f : mn;
    s = s * ex2(m - base) + so * ex2(mo - base);
    m = mn;
  }
}

// Probabilities p = 2^(c2 * logit - lse2 of the row) of a warp's 32 x 32 sub-tile (acc from
// warp_logits<T, 2, 4>; lse2[mt][hr] of its rows), zero outside the valid rows rv[mt][hr] and columns
// cv[nt][c] (padding; the select drops a NaN of a padding row too), added to the lane's column sums
// colacc[nt][c] (running, over query tiles) and row sums rowacc[mt][hr] (this tile's keys).
__device__ __forceinline__ void prob_tile_sums(const float (&acc)[2][4][4], float c2, const float (&lse2)[2][2],
                                               const bool (&rv)[2][2], const bool (&cv)[4][2], float (&colacc)[4][2],
                                               float (&rowacc)[2][2]) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hr = e >> 1, c = e & 1;
        float p = ex2(fmaf(acc[mt][nt][e], c2, -lse2[mt][hr]));
        p = rv[mt][hr] && cv[nt][c] ? p : 0.0f;
        colacc[nt][c] += p;
        rowacc[mt][hr] += p;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Calls f(T{}) with q's element type.
template <typename F>
void dispatch_qk(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kFloat: f(float{}); break;
    default: TORCH_CHECK(false, "fopru: unexpected q/k dtype ", t);
  }
}

// Rows of m readable as 16-byte chunks: unit-stride rows of d elements (es bytes each), d * es a
// multiple of 16, every row start of the (B, H, rows) rows 16-byte aligned. The row stride must be a
// multiple of 16 bytes even for a single row: the packed kernels decide for all segments at once from
// (T, H, d), so a 1-token segment q[t0 : t0 + 1] handed to the dense kernel alone must get the same
// answer, or its logit dots would sum in another order (found by simulating the index math).
inline bool rows_vectorizable(const MatView& m, int64_t es, int64_t d, int64_t B, int64_t H) {
  const int64_t v = 16 / es;
  auto ok = [v](int64_t stride, int64_t size) { return size <= 1 || stride % v == 0; };
  return d % v == 0 && (d <= 1 || m.sd == 1) && reinterpret_cast<uintptr_t>(m.p) % 16 == 0 && ok(m.sb, B) &&
         ok(m.sh, H) && m.ss % v == 0;
}

// Shared-memory geometry of the tile kernels: rows of d elements padded to dpad (a multiple of 16,
// zeros), ld elements apart.
struct TileGeom {
  int d, dpad, ld;
  int64_t bytes;  // three 64-row tiles
};

inline TileGeom tile_geom(int64_t d, int64_t es) {
  TileGeom t{};
  t.d = static_cast<int>(d);
  t.dpad = static_cast<int>(ceil_div(d, 16) * 16);
  t.ld = t.dpad + (es == 2 ? 8 : 4);
  t.bytes = 3 * kTile * static_cast<int64_t>(t.ld) * es;
  return t;
}

// Refuses a tile kernel launch whose three tiles do not fit a CTA's shared memory on this GPU
// (large head dims; `op` names the op in the message), else opts Kernel in to them.
template <auto Kernel>
void allow_tile_smem(std::string_view op, const TileGeom& tg, const Ctx& ctx) {
  TORCH_CHECK(tg.bytes <= ctx.smem_limit, "fopru: ", op, " with kind='prob' and head dim d = ", tg.d, " needs ",
              tg.bytes, " bytes of shared memory per CTA, more than this GPU's ", ctx.smem_limit);
  allow_dynamic_smem<Kernel>(tg.bytes, ctx);
}

}  // namespace
}  // namespace fopru
