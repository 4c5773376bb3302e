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
// Then the focal choice, selection and gather of cuda/prune_tokens.cu (stages.h).
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
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "fopru.h"
#include "ops.h"
#include "stages.h"

namespace fopru {
namespace {

using ull = unsigned long long;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr double kLog2e = 1.4426950408889634;

// _qk_dot_kernel: a group of L lanes (power of two) shares one row of d elements.
constexpr int kDotThreads = 256;
constexpr int kDotRows = 2;            // rows per lane group
constexpr int kDotHeads = 4;           // heads per step: kDotRows * kDotHeads loads in flight per lane
constexpr int64_t kDotSmem = 32 * 1024;  // per-head vectors staged in shared memory per pass
constexpr int64_t kMaxHeadDim = 8192;    // one head's vector must fit kDotSmem
// _qk_patch_sum_kernel
constexpr int kSumThreads = 256;
// Tensor-core tiles: 64 queries x 64 keys, 4 warps.
constexpr int kTile = 64;
constexpr int kMapThreads = 128;
constexpr int kMapGroups = 4;  // CTAs per (image, head) that split the key blocks (at most)
constexpr int kFinishThreads = 256;
constexpr int64_t kSmemReserve = 4096;  // static shared memory and margin under the opt-in limit

// ---------------------------------------------------------------------------------------------
// Element access
// ---------------------------------------------------------------------------------------------

// Element (b, h, s, e) of q or k at p + b * sb + h * sh + s * ss + e * sd (elements).
struct MatView {
  const void* p;
  int64_t sb, sh, ss, sd;
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

// acc + chunk . u over the 16 / sizeof(T) elements of a 16-byte chunk, in element order.
template <typename T>
__device__ __forceinline__ float fma_chunk16(const uint4& raw, const float* u, float acc) {
  const float4 u0 = reinterpret_cast<const float4*>(u)[0];
  if constexpr (std::is_same_v<T, float>) {
    acc = fmaf(__uint_as_float(raw.x), u0.x, acc);
    acc = fmaf(__uint_as_float(raw.y), u0.y, acc);
    acc = fmaf(__uint_as_float(raw.z), u0.z, acc);
    acc = fmaf(__uint_as_float(raw.w), u0.w, acc);
  } else {
    const float4 u1 = reinterpret_cast<const float4*>(u)[1];
    const float2 e0 = unpack2<T>(raw.x), e1 = unpack2<T>(raw.y), e2 = unpack2<T>(raw.z), e3 = unpack2<T>(raw.w);
    acc = fmaf(e0.x, u0.x, acc);
    acc = fmaf(e0.y, u0.y, acc);
    acc = fmaf(e1.x, u0.z, acc);
    acc = fmaf(e1.y, u0.w, acc);
    acc = fmaf(e2.x, u1.x, acc);
    acc = fmaf(e2.y, u1.y, acc);
    acc = fmaf(e3.x, u1.z, acc);
    acc = fmaf(e3.y, u1.w, acc);
  }
  return acc;
}

// 2^x on the special-function unit (relative error ~2^-22; results below 2^-126 flush to zero,
// far below fx's resolution of 2^-28).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Lanes per row in _qk_dot_kernel: the power of two covering the row's chunks, at most a warp.
__host__ __device__ inline int dot_lanes(int64_t chunks) {
  int l = 1;
  while (l < chunks && l < kWarp) l <<= 1;
  return l;
}

// ---------------------------------------------------------------------------------------------
// _qk_dot_kernel: out[b, j] = sum_h fx(f(u[b, h] . x[b, h, row0 + j])) for j < n, where
// f(s) = c * s (logit) or 2^(c * s - lse2[b, h]) (prob; c includes log2(e))
// ---------------------------------------------------------------------------------------------

struct DotJob {
  MatView x;     // rows x[b, h, row0 + j]
  int64_t row0;
  bool vec;      // x rows as 16-byte chunks
  MatView u;     // u[b, h, e] (ss unused): query 0 of q (input dtype) or a float32 workspace
  bool u_f32;
  int64_t* out;  // out[b * out_sb + j]
  int64_t out_sb;
};

struct DotSpec {
  int64_t H, n, d;
  int64_t hc;   // heads staged in shared memory per pass
  int64_t cpi;  // CTAs per image
  float c;
  bool prob;
  LseView lse;  // prob: lse.at(b, h, 0)
};

template <typename T, bool VEC>
__device__ void dot_rows(const DotJob& job, const DotSpec& sp, int64_t b, int64_t chunk, float* s_u) {
  constexpr int V = VEC ? static_cast<int>(16 / sizeof(T)) : 1;
  using Chunk = std::conditional_t<VEC, uint4, T>;
  const int64_t d = sp.d;
  const int C = static_cast<int>(d / V);  // chunks per row (VEC implies d % V == 0)
  const int L = dot_lanes(C);
  const int groups = static_cast<int>(blockDim.x) / L;
  const int grp = static_cast<int>(threadIdx.x) / L, lr = static_cast<int>(threadIdx.x) % L;
  const int64_t j0 = chunk * kDotRows * groups;
  if (j0 >= sp.n) return;  // whole CTA: the other job needs more CTAs per image
  const int per_lane = (C + L - 1) / L;
  float* s_lse = s_u + sp.hc * d;
  const T* xb = static_cast<const T*>(job.x.p) + b * job.x.sb + job.row0 * job.x.ss;

  int64_t jr[kDotRows];
  bool ok[kDotRows];
  int64_t acc[kDotRows];
#pragma unroll
  for (int r = 0; r < kDotRows; ++r) {
    jr[r] = j0 + static_cast<int64_t>(r) * groups + grp;
    ok[r] = jr[r] < sp.n;
    acc[r] = 0;
  }
  for (int64_t h0 = 0; h0 < sp.H; h0 += sp.hc) {
    const int nh = static_cast<int>(min64(sp.hc, sp.H - h0));
    __syncthreads();  // the previous pass is done with s_u
    for (int64_t idx = threadIdx.x; idx < nh * d; idx += blockDim.x) {
      const int64_t hh = idx / d, e = idx - hh * d;
      const int64_t off = b * job.u.sb + (h0 + hh) * job.u.sh + e * job.u.sd;
      s_u[idx] = job.u_f32 ? static_cast<const float*>(job.u.p)[off] : to_f(static_cast<const T*>(job.u.p)[off]);
    }
    if (sp.prob) {
      for (int hh = threadIdx.x; hh < nh; hh += blockDim.x) s_lse[hh] = sp.lse.at(b, h0 + hh, 0);
    }
    __syncthreads();
    for (int hh = 0; hh < nh; hh += kDotHeads) {
      float part[kDotRows][kDotHeads];
#pragma unroll
      for (int r = 0; r < kDotRows; ++r) {
#pragma unroll
        for (int k = 0; k < kDotHeads; ++k) part[r][k] = 0.0f;
      }
      for (int it = 0; it < per_lane; ++it) {
        const int c = lr + it * L;
        // All loads first, so kDotRows * kDotHeads of them are in flight.
        Chunk raw[kDotRows][kDotHeads];
#pragma unroll
        for (int r = 0; r < kDotRows; ++r) {
#pragma unroll
          for (int k = 0; k < kDotHeads; ++k) {
            if (ok[r] && c < C && hh + k < nh) {
              const T* row = xb + (h0 + hh + k) * job.x.sh + jr[r] * job.x.ss;
              if constexpr (VEC) {
                raw[r][k] = *reinterpret_cast<const uint4*>(row + c * V);
              } else {
                raw[r][k] = row[c * job.x.sd];
              }
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kDotRows; ++r) {
#pragma unroll
          for (int k = 0; k < kDotHeads; ++k) {
            if (ok[r] && c < C && hh + k < nh) {
              const float* u = s_u + (hh + k) * d + c * V;
              if constexpr (VEC) {
                part[r][k] = fma_chunk16<T>(raw[r][k], u, part[r][k]);
              } else {
                part[r][k] = fmaf(to_f(raw[r][k]), *u, part[r][k]);
              }
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kDotRows; ++r) {
#pragma unroll
        for (int k = 0; k < kDotHeads; ++k) {
          float s = part[r][k];
          // Butterfly within the group: every lane adds the same pair, so all lanes agree.
          for (int o = L / 2; o > 0; o >>= 1) s += __shfl_xor_sync(kFullMask, s, o);
          if (hh + k < nh) {
            const float v = sp.prob ? ex2(fmaf(s, sp.c, -s_lse[hh + k])) : s * sp.c;
            acc[r] += fx(v);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kDotRows; ++r) {
    if (lr == 0 && ok[r]) job.out[b * job.out_sb + jr[r]] = acc[r];
  }
}

// Grid (B * cpi, jobs). Dynamic shared memory: hc * d floats of u, then hc floats of lse2.
template <typename T>
__global__ void __launch_bounds__(kDotThreads) _qk_dot_kernel(DotJob job0, DotJob job1, DotSpec sp) {
  extern __shared__ __align__(16) unsigned char smem[];
  const DotJob job = blockIdx.y == 0 ? job0 : job1;
  const int64_t b = blockIdx.x / sp.cpi, chunk = blockIdx.x - b * sp.cpi;
  float* s_u = reinterpret_cast<float*>(smem);
  if (job.vec) {
    dot_rows<T, true>(job, sp, b, chunk, s_u);
  } else {
    dot_rows<T, false>(job, sp, b, chunk, s_u);
  }
}

// ---------------------------------------------------------------------------------------------
// _qk_patch_sum_kernel: out[y, b, h, e] = sum_{i<N} x_y[b, h, P + i, e] in float32, fixed order
// ---------------------------------------------------------------------------------------------

struct SumJob {
  MatView x;
  bool vec;
};

// Threads split a row into C chunks and the rows into rg row groups; each thread sums its rows in
// order, then the row groups are added in order.
template <typename T, bool VEC>
__device__ void sum_rows(const SumJob& job, int64_t b, int64_t h, int64_t N, int64_t P, int64_t d, float* out,
                         float* part) {
  constexpr int V = VEC ? static_cast<int>(16 / sizeof(T)) : 1;
  const int64_t C = d / V;
  const int64_t rg = static_cast<int64_t>(blockDim.x) / C > 1 ? static_cast<int64_t>(blockDim.x) / C : 1;
  const T* xb = static_cast<const T*>(job.x.p) + b * job.x.sb + h * job.x.sh + P * job.x.ss;
  auto row_sum = [&](int64_t c, int64_t i0, int64_t step, float (&s)[V]) {
#pragma unroll
    for (int v = 0; v < V; ++v) s[v] = 0.0f;
#pragma unroll 4
    for (int64_t i = i0; i < N; i += step) {
      const T* row = xb + i * job.x.ss;
      if constexpr (VEC) {
        const uint4 raw = *reinterpret_cast<const uint4*>(row + c * V);
        if constexpr (std::is_same_v<T, float>) {
          s[0] += __uint_as_float(raw.x);
          s[1] += __uint_as_float(raw.y);
          s[2] += __uint_as_float(raw.z);
          s[3] += __uint_as_float(raw.w);
        } else {
          const float2 f0 = unpack2<T>(raw.x), f1 = unpack2<T>(raw.y), f2 = unpack2<T>(raw.z), f3 = unpack2<T>(raw.w);
          s[0] += f0.x;
          s[1] += f0.y;
          s[2] += f1.x;
          s[3] += f1.y;
          s[4] += f2.x;
          s[5] += f2.y;
          s[6] += f3.x;
          s[7] += f3.y;
        }
      } else {
        s[0] += to_f(row[c * job.x.sd]);
      }
    }
  };
  if (rg == 1) {  // wide rows: one thread per chunk sums every row
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float s[V];
      row_sum(c, 0, 1, s);
#pragma unroll
      for (int v = 0; v < V; ++v) out[c * V + v] = s[v];
    }
    return;
  }
  const int64_t g = threadIdx.x / C, c = threadIdx.x - g * C;
  if (g < rg) {
    float s[V];
    row_sum(c, g, rg, s);
#pragma unroll
    for (int v = 0; v < V; ++v) part[g * d + c * V + v] = s[v];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < d; e += blockDim.x) {
    float t = 0.0f;
    for (int64_t r = 0; r < rg; ++r) t += part[r * d + e];
    out[e] = t;
  }
}

// Grid (B * H, jobs); out is (jobs, B, H, d) float32.
template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    _qk_patch_sum_kernel(SumJob job0, SumJob job1, int64_t B, int64_t H, int64_t N, int64_t P, int64_t d,
                         float* __restrict__ out) {
  // rg * C <= blockDim.x when rg > 1, so the partials take at most blockDim.x * 16 / sizeof(T) floats.
  __shared__ float part[kSumThreads * 8];
  const SumJob job = blockIdx.y == 0 ? job0 : job1;
  const int64_t b = blockIdx.x / H, h = blockIdx.x - b * H;
  float* o = out + ((static_cast<int64_t>(blockIdx.y) * B + b) * H + h) * d;
  if (job.vec) {
    sum_rows<T, true>(job, b, h, N, P, d, o, part);
  } else {
    sum_rows<T, false>(job, b, h, N, P, d, o, part);
  }
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
// _qk_lse_kernel: lse2[b, h, i] = log2 sum_{s<S} 2^(c2 * q[b, h, r0 + i] . k[b, h, s]) for i < nr
// ---------------------------------------------------------------------------------------------

struct LseSpec {
  MatView q, k;
  bool q_vec, k_vec;
  int64_t H, S, r0, nr;
  int d, dpad, ld, nqb;
  float c2;    // scale * log2(e)
  float* out;  // (B, H, nr)
};

// CTA per (image, head, block of 64 queries), streaming all S keys in double-buffered tiles.
// Warp w owns query rows 16 w .. 16 w + 15 and all 64 keys of a tile; each lane keeps an online
// (max, sum) for its two rows over its own columns, and the four lanes of a row merge at the end.
template <typename T>
__global__ void __launch_bounds__(kMapThreads) _qk_lse_kernel(const LseSpec sp) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* const qs = reinterpret_cast<T*>(smem);
  T* const ks0 = qs + kTile * sp.ld;
  const int64_t cta = blockIdx.x;
  const int64_t bh = cta / sp.nqb, qb = cta - bh * sp.nqb;
  const int64_t b = bh / sp.H, h = bh - b * sp.H;
  zero_pad(qs, 3 * kTile, sp.ld, sp.d, sp.dpad);
  const T* qbase = static_cast<const T*>(sp.q.p) + b * sp.q.sb + h * sp.q.sh + (sp.r0 + qb * kTile) * sp.q.ss;
  const T* kbase = static_cast<const T*>(sp.k.p) + b * sp.k.sb + h * sp.k.sh;
  const int64_t i0 = qb * kTile;
  const int warp = static_cast<int>(threadIdx.x) / kWarp, lane = static_cast<int>(threadIdx.x) & (kWarp - 1);
  const int g = lane >> 2, t = lane & 3;
  const int64_t nkb = (sp.S + kTile - 1) / kTile;

  load_tile<T>(qs, sp.ld, qbase, sp.q.ss, sp.q.sd, min64(kTile, sp.nr - i0), sp.d, sp.q_vec);
  load_tile<T>(ks0, sp.ld, kbase, sp.k.ss, sp.k.sd, min64(kTile, sp.S), sp.d, sp.k_vec);
  cp_async_commit();
  float m[2] = {-INFINITY, -INFINITY}, s[2] = {0.0f, 0.0f};
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t j0 = kb * kTile;
    const T* cur = ks0 + (kb & 1) * kTile * sp.ld;
    if (kb + 1 < nkb) {
      load_tile<T>(ks0 + ((kb + 1) & 1) * kTile * sp.ld, sp.ld, kbase + (j0 + kTile) * sp.k.ss, sp.k.ss, sp.k.sd,
                   min64(kTile, sp.S - j0 - kTile), sp.d, sp.k_vec);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    float acc[1][8][4];
    warp_logits<T, 1, 8>(qs, cur, sp.ld, sp.d, sp.dpad, 16 * warp, 0, acc);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float x[16];
      float tmax = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const bool valid = j0 + 8 * nt + 2 * t + c < sp.S;
          const float v = valid ? acc[0][nt][2 * hr + c] * sp.c2 : -INFINITY;
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
    __syncthreads();  // cur is overwritten by the next prefetch
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    // Each pair of lanes adds the same two terms, so the four lanes of a row end equal.
    for (int o = 1; o <= 2; o <<= 1) {
      const float mo = __shfl_xor_sync(kFullMask, m[hr], o);
      const float so = __shfl_xor_sync(kFullMask, s[hr], o);
      const float mn = fmaxf(m[hr], mo);
      const float base = mn == -INFINITY ? 0.0f : mn;
      s[hr] = s[hr] * ex2(m[hr] - base) + so * ex2(mo - base);
      m[hr] = mn;
    }
    const int64_t i = i0 + 16 * warp + g + 8 * hr;
    if (t == 0 && i < sp.nr) sp.out[bh * sp.nr + i] = m[hr] + log2f(s[hr]);
  }
}

// ---------------------------------------------------------------------------------------------
// _qk_prob_map_kernel: column (and row) sums of p_ij = 2^(c2 l_ij - lse2_i) over the patch block
// ---------------------------------------------------------------------------------------------

struct MapSpec {
  MatView q, k;
  bool q_vec, k_vec;
  int64_t B, H, N, P;
  int d, dpad, ld;
  int nkb, kpg, groups;  // key blocks, key blocks per CTA, CTAs per (image, head)
  float c2;              // scale * log2(e)
  LseView lse;           // lse2 of patch query i: lse.at(b, h, i)
  int64_t* col;          // col[b * col_sb + j] += sum_h fx(colmean), zeroed before
  int64_t col_sb;
  float* row_part;  // focal: (2 * groups, B, H, N) partial row sums; null for received
};

// CTA per (image, head, group of kpg key blocks). For each 64-key block (kept in shared memory) it
// streams the N patch queries in double-buffered 64-row tiles. Warps form 2 x 2 (query rows x key
// columns) of 32 x 32. Column sums stay in registers across the query tiles, in tile order, then
// fold over the 8 lanes of a column and the 2 row warps: complete per CTA, so colmean = sum / N
// goes straight through fx into an int64 atomic (the head sum). Row sums of a tile fold over the
// 4 lanes of a row; they are complete only over all key blocks, so slot (group, column warp) of
// row_part accumulates its own key blocks in order and _qk_row_finish_kernel adds the slots.
template <typename T>
__global__ void __launch_bounds__(kMapThreads) _qk_prob_map_kernel(const MapSpec sp) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_col[2][kTile];
  T* const ks = reinterpret_cast<T*>(smem);
  T* const qs0 = ks + kTile * sp.ld;
  const int64_t cta = blockIdx.x;
  const int64_t bh = cta / sp.groups;
  const int grp = static_cast<int>(cta - bh * sp.groups);
  const int64_t b = bh / sp.H, h = bh - b * sp.H;
  const int64_t n = sp.N;
  zero_pad(ks, 3 * kTile, sp.ld, sp.d, sp.dpad);
  const T* qbase = static_cast<const T*>(sp.q.p) + b * sp.q.sb + h * sp.q.sh + sp.P * sp.q.ss;
  const T* kbase = static_cast<const T*>(sp.k.p) + b * sp.k.sb + h * sp.k.sh + sp.P * sp.k.ss;
  const int warp = static_cast<int>(threadIdx.x) / kWarp, lane = static_cast<int>(threadIdx.x) & (kWarp - 1);
  const int wr = warp >> 1, wc = warp & 1;
  const int g = lane >> 2, t = lane & 3;
  const int64_t nqb = (n + kTile - 1) / kTile;
  const int kb0 = grp * sp.kpg, kb1 = min(sp.nkb, kb0 + sp.kpg);
  float* rows_out =
      sp.row_part != nullptr ? sp.row_part + ((static_cast<int64_t>(2 * grp + wc) * sp.B + b) * sp.H + h) * n : nullptr;

  for (int kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = static_cast<int64_t>(kb) * kTile;
    load_tile<T>(ks, sp.ld, kbase + j0 * sp.k.ss, sp.k.ss, sp.k.sd, min64(kTile, n - j0), sp.d, sp.k_vec);
    load_tile<T>(qs0, sp.ld, qbase, sp.q.ss, sp.q.sd, min64(kTile, n), sp.d, sp.q_vec);
    cp_async_commit();
    bool cv[4][2];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) cv[nt][c] = j0 + 32 * wc + 8 * nt + 2 * t + c < n;
    }
    float colacc[4][2] = {};
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int64_t i0 = qb * kTile;
      const T* cur = qs0 + (qb & 1) * kTile * sp.ld;
      if (qb + 1 < nqb) {
        load_tile<T>(qs0 + ((qb + 1) & 1) * kTile * sp.ld, sp.ld, qbase + (i0 + kTile) * sp.q.ss, sp.q.ss, sp.q.sd,
                     min64(kTile, n - i0 - kTile), sp.d, sp.q_vec);
      }
      cp_async_commit();
      // Per-row inputs, loaded before the wait so their latency overlaps the tile's.
      bool rv[2][2];
      float lse2[2][2], old[2][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int64_t i = i0 + 32 * wr + 16 * mt + g + 8 * hr;
          rv[mt][hr] = i < n;
          lse2[mt][hr] = rv[mt][hr] ? sp.lse.at(b, h, i) : 0.0f;
          // Only this thread wrote rows_out[i] of this slot (at the previous key block).
          old[mt][hr] = rows_out != nullptr && t == 0 && rv[mt][hr] && kb > kb0 ? rows_out[i] : 0.0f;
        }
      }
      cp_async_wait<1>();
      __syncthreads();
      float acc[2][4][4];
      warp_logits<T, 2, 4>(cur, ks, sp.ld, sp.d, sp.dpad, 32 * wr, 32 * wc, acc);
      float rowacc[2][2] = {};
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int hr = e >> 1, c = e & 1;
            float p = ex2(fmaf(acc[mt][nt][e], sp.c2, -lse2[mt][hr]));
            p = rv[mt][hr] && cv[nt][c] ? p : 0.0f;  // padding rows / columns (select: drops NaN too)
            colacc[nt][c] += p;
            rowacc[mt][hr] += p;
          }
        }
      }
      if (rows_out != nullptr) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            float r = rowacc[mt][hr];
            r += __shfl_xor_sync(kFullMask, r, 1);
            r += __shfl_xor_sync(kFullMask, r, 2);
            if (t == 0 && rv[mt][hr]) rows_out[i0 + 32 * wr + 16 * mt + g + 8 * hr] = old[mt][hr] + r;
          }
        }
      }
      __syncthreads();  // cur is overwritten by the next prefetch
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float v = colacc[nt][c];
        v += __shfl_xor_sync(kFullMask, v, 4);
        v += __shfl_xor_sync(kFullMask, v, 8);
        v += __shfl_xor_sync(kFullMask, v, 16);
        if (g == 0) s_col[wr][32 * wc + 8 * nt + 2 * t + c] = v;
      }
    }
    __syncthreads();
    // s_col is next written after the next key block's query loop, whose barriers order it.
    if (threadIdx.x < kTile) {
      const int64_t j = j0 + threadIdx.x;
      if (j < n) {
        const float mean = (s_col[0][threadIdx.x] + s_col[1][threadIdx.x]) / static_cast<float>(n);
        atomicAdd(reinterpret_cast<ull*>(sp.col + b * sp.col_sb + j), static_cast<ull>(fx(mean)));
      }
    }
  }
}

// row[b * row_sb + i] = sum_h fx((sum over slots of part[slot, b, h, i]) / N), slots in order.
__global__ void __launch_bounds__(kFinishThreads)
    _qk_row_finish_kernel(const float* __restrict__ part, int slots, int64_t B, int64_t H, int64_t N,
                          int64_t* __restrict__ row, int64_t row_sb) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * N) return;
  const int64_t b = idx / N, i = idx - b * N;
  int64_t acc = 0;
  for (int64_t h = 0; h < H; ++h) {
    float s = 0.0f;
    for (int sl = 0; sl < slots; ++sl) s += part[((sl * B + b) * H + h) * N + i];
    acc += fx(s / static_cast<float>(N));
  }
  row[b * row_sb + i] = acc;
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Ctx {
  cudaStream_t stream;
  int64_t smem_limit;  // dynamic shared memory a CTA may opt in to
  at::TensorOptions f32;
};

Ctx make_ctx(const at::Tensor& like) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> smem_cache{};
  const int dev = like.get_device();
  int smem = dev < kMaxDevices ? smem_cache[dev].load(std::memory_order_relaxed) : 0;
  if (smem == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (dev < kMaxDevices) smem_cache[dev].store(smem, std::memory_order_relaxed);
  }
  return Ctx{c10::cuda::getCurrentCUDAStream(dev).stream(), static_cast<int64_t>(smem) - kSmemReserve,
             like.options().dtype(at::kFloat)};
}

// Above 48 KiB a kernel must opt in; always to the device's whole limit (see prune_tokens.cu: the
// attribute is per kernel and device, so a smaller value could race a concurrent larger launch).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int64_t bytes, const Ctx& ctx, int64_t d) {
  TORCH_CHECK(bytes <= ctx.smem_limit, "fopru: significance_qk with kind='prob' and head dim d = ", d, " needs ",
              bytes, " bytes of shared memory per CTA, more than this GPU's ", ctx.smem_limit);
  if (bytes + kSmemReserve > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(ctx.smem_limit)));
  }
}

template <typename F>
void dispatch_qk(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kFloat: f(float{}); break;
    default: TORCH_CHECK(false, "fopru: unexpected q/k dtype ", t);
  }
}

// Rows readable as 16-byte chunks: unit-stride rows of a multiple of 16 bytes, every row start aligned.
bool rows_vectorizable(const MatView& m, int64_t es, const QkArgs& a) {
  const int64_t v = 16 / es;
  auto ok = [v](int64_t stride, int64_t size) { return size <= 1 || stride % v == 0; };
  return a.d % v == 0 && (a.d <= 1 || m.sd == 1) && reinterpret_cast<uintptr_t>(m.p) % 16 == 0 && ok(m.sb, a.B) &&
         ok(m.sh, a.H) && ok(m.ss, a.S);
}

struct TileGeom {
  int d, dpad, ld;
  int64_t bytes;  // three 64-row tiles
};

TileGeom tile_geom(int64_t d, int64_t es) {
  TileGeom t{};
  t.d = static_cast<int>(d);
  t.dpad = static_cast<int>(ceil_div(d, 16) * 16);
  t.ld = t.dpad + (es == 2 ? 8 : 4);
  t.bytes = 3 * kTile * static_cast<int64_t>(t.ld) * es;
  return t;
}

LseView given_lse(const at::Tensor& lse, int64_t s0) {
  return LseView{lse.const_data_ptr<float>(), lse.stride(0), lse.stride(1), lse.stride(2), s0,
                 static_cast<float>(kLog2e)};
}

// lse2 of queries r0 .. r0 + nr - 1 of every (image, head) into ws (B, H, nr); returns its view.
template <typename T>
LseView launch_lse(const MatView& q, bool q_vec, const MatView& k, bool k_vec, const QkArgs& a, int64_t r0, int64_t nr,
                   at::Tensor& ws, const Ctx& ctx) {
  ws = at::empty({a.B, a.H, nr}, ctx.f32);
  float* out = ws.mutable_data_ptr<float>();
  const TileGeom tg = tile_geom(a.d, sizeof(T));
  LseSpec sp{q, k, q_vec, k_vec, a.H, a.S, r0, nr, tg.d, tg.dpad, tg.ld, static_cast<int>(ceil_div(nr, kTile)),
             static_cast<float>(a.scale * kLog2e), out};
  const int64_t blocks = a.B * a.H * sp.nqb;
  if (blocks > 0) {
    TORCH_CHECK(blocks <= INT_MAX, "fopru: q/k too large for one launch (", blocks, " CTAs)");
    const auto kernel = _qk_lse_kernel<T>;
    allow_dynamic_smem(kernel, tg.bytes, ctx, a.d);
    kernel<<<static_cast<unsigned>(blocks), kMapThreads, tg.bytes, ctx.stream>>>(sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return LseView{out, a.H * nr, nr, 1, 0, 1.0f};
}

// One or two dot jobs sharing spec `sp` (n, c, prob, lse set by the caller).
template <typename T>
void launch_dot(const DotJob& job0, const DotJob* job1, DotSpec sp, int64_t B, const Ctx& ctx) {
  constexpr int64_t V = 16 / sizeof(T);
  int64_t cpi = 0;
  for (const DotJob* j : {&job0, job1}) {
    if (j == nullptr) continue;
    const int64_t rows = kDotRows * (kDotThreads / dot_lanes(j->vec ? sp.d / V : sp.d));
    cpi = std::max(cpi, ceil_div(sp.n, rows));
  }
  sp.cpi = cpi;
  sp.hc = std::max<int64_t>(1, std::min<int64_t>(sp.H, kDotSmem / (4 * (sp.d + 1))));
  const int64_t blocks = B * cpi;
  TORCH_CHECK(blocks <= INT_MAX, "fopru: q/k too large for one launch (", blocks, " CTAs)");
  const dim3 grid(static_cast<unsigned>(blocks), job1 != nullptr ? 2u : 1u);
  const int64_t smem = 4 * sp.hc * (sp.d + 1);
  _qk_dot_kernel<T><<<grid, kDotThreads, smem, ctx.stream>>>(job0, job1 != nullptr ? *job1 : job0, sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Column sums (and, when row is non-null, row sums) of SPEC.md's q/k significance: col[b * sb + j],
// row[b * sb + i], int64. cls writes only col.
template <typename T>
void qk_sums(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse, const QkArgs& a,
             int64_t* col, int64_t* row, int64_t sb, const Ctx& ctx) {
  constexpr int64_t es = sizeof(T);
  TORCH_CHECK(a.d <= kMaxHeadDim, "fopru: significance_qk supports head dim d <= ", kMaxHeadDim, " on CUDA, got ", a.d);
  const MatView qv{q.data_ptr(), a.q_sb, a.q_sh, a.q_ss, a.q_sd};
  const MatView kv{k.data_ptr(), a.k_sb, a.k_sh, a.k_ss, a.k_sd};
  const bool q_vec = rows_vectorizable(qv, es, a), k_vec = rows_vectorizable(kv, es, a);
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
    const at::Tensor sums = at::empty({focal ? 2 : 1, a.B, a.H, a.d}, ctx.f32);
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
  sp.d = tg.d;
  sp.dpad = tg.dpad;
  sp.ld = tg.ld;
  TORCH_CHECK(ceil_div(a.N, kTile) <= INT_MAX, "fopru: N = ", a.N, " too large");
  sp.nkb = static_cast<int>(ceil_div(a.N, kTile));
  // The key-block split depends on N only, so the row sums' float order does not depend on B.
  sp.kpg = static_cast<int>(ceil_div(sp.nkb, kMapGroups));
  sp.groups = static_cast<int>(ceil_div(sp.nkb, sp.kpg));
  sp.c2 = static_cast<float>(a.scale * kLog2e);
  sp.lse = lv;
  sp.col = col;
  sp.col_sb = sb;
  at::Tensor part;
  if (focal) {
    part = at::empty({2 * sp.groups, a.B, a.H, a.N}, ctx.f32);
    sp.row_part = part.mutable_data_ptr<float>();
  }
  const int64_t blocks = a.B * a.H * sp.groups;
  if (blocks > 0) {
    TORCH_CHECK(blocks <= INT_MAX, "fopru: q/k too large for one launch (", blocks, " CTAs)");
    const auto kernel = _qk_prob_map_kernel<T>;
    allow_dynamic_smem(kernel, tg.bytes, ctx, a.d);
    kernel<<<static_cast<unsigned>(blocks), kMapThreads, tg.bytes, ctx.stream>>>(sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (focal) {
    const int64_t fb = ceil_div(a.B * a.N, kFinishThreads);
    TORCH_CHECK(fb <= INT_MAX, "fopru: q/k too large for one launch (", fb, " CTAs)");
    _qk_row_finish_kernel<<<static_cast<unsigned>(fb), kFinishThreads, 0, ctx.stream>>>(
        sp.row_part, 2 * sp.groups, a.B, a.H, a.N, row, sb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Column sums into sums[:, :N] and, for focal, row sums into sums[:, N:] of sums (B, N or 2N).
void compute_sums(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse, const QkArgs& a,
                  at::Tensor& sums) {
  const Ctx ctx = make_ctx(q);
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
