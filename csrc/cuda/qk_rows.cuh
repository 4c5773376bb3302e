// CUDA-core row code of the q/k kernels (cuda/significance_qk.cu, and any segmented variant): dots
// of rows of q or k against one vector per head staged in shared memory (the cls values and the
// logit means' closed forms), and sums of rows over the patch tokens in a fixed order (the mean
// query and key). Rows are addressed through MatView (qk_tiles.cuh) from a first row `row0`, and
// `b` only picks the staged vector and the output row, so a kernel over cu_seqlens segments builds
// its DotJob / DotSpec per segment on the device: x with batch stride 0 and row0 = the segment's
// first token, out pointing at it, n = the segment's length, b = the segment's index.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "common.cuh"
#include "fopru.h"
#include "qk_tiles.cuh"

namespace fopru {
namespace {

// _qk_dot_kernel: a group of L lanes (power of two) shares one row of d elements.
constexpr int kDotThreads = 256;
constexpr int kDotRows = 2;            // rows per lane group
constexpr int kDotHeads = 4;           // heads per step: kDotRows * kDotHeads loads in flight per lane
constexpr int64_t kDotSmem = 32 * 1024;  // per-head vectors staged in shared memory per pass
constexpr int64_t kMaxHeadDim = 8192;    // one head's vector must fit kDotSmem
// _qk_patch_sum_kernel
constexpr int kSumThreads = 256;

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

// dot_rows with the job's row access (16-byte chunks or elements) picked at run time.
template <typename T>
__device__ __forceinline__ void dot_rows_of(const DotJob& job, const DotSpec& sp, int64_t b, int64_t chunk,
                                            float* s_u) {
  if (job.vec) {
    dot_rows<T, true>(job, sp, b, chunk, s_u);
  } else {
    dot_rows<T, false>(job, sp, b, chunk, s_u);
  }
}

// Host: heads staged per pass (hc), rows one CTA of the dot kernel covers for a job, its dynamic
// shared memory (hc * d floats of u, then hc floats of lse2).
inline int64_t dot_heads_per_pass(int64_t H, int64_t d) {
  return std::max<int64_t>(1, std::min<int64_t>(H, kDotSmem / (4 * (d + 1))));
}
inline int64_t dot_rows_per_cta(int64_t d, bool vec, int64_t es) {
  return kDotRows * (kDotThreads / dot_lanes(vec ? d / (16 / es) : d));
}
inline int64_t dot_smem_bytes(const DotSpec& sp) { return 4 * sp.hc * (sp.d + 1); }

// SPEC.md "Backend limits": one head's vector must fit the dot kernel's shared memory. Checked
// before anything else of a call (op names it), so a too large d fails whatever the sizes are.
inline void check_head_dim(std::string_view op, int64_t d) {
  TORCH_CHECK(d <= kMaxHeadDim, "fopru: ", op, " supports head dim d <= ", kMaxHeadDim, " on CUDA, got ", d);
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

// sum_rows with the job's row access picked at run time.
template <typename T>
__device__ __forceinline__ void sum_rows_of(const SumJob& job, int64_t b, int64_t h, int64_t N, int64_t P, int64_t d,
                                            float* out, float* part) {
  if (job.vec) {
    sum_rows<T, true>(job, b, h, N, P, d, out, part);
  } else {
    sum_rows<T, false>(job, b, h, N, P, d, out, part);
  }
}

}  // namespace
}  // namespace fopru
