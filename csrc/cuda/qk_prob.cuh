// The work units of the q/k kernels' `prob` path, per (map, head): one block of 64 queries' logsumexp
// over all keys, one group of key blocks' probability column and row sums, and the finish of the row
// sums. A map is an image of the dense ops (cuda/significance_qk.cu: CTA per (image, head, unit), the
// patch block from row P) or an attention segment of the packed ops (cuda/significance_qk_varlen.cu:
// CTA per (segment, head, unit), the segment from its first token): both kernels map their CTA to a
// unit and call these bodies with the map's first rows, so a segment's float work is the dense
// kernel's on that segment alone, in the same order. Built on the tiles of qk_tiles.cuh.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "fopru.h"
#include "qk_tiles.cuh"

namespace fopru {
namespace {

constexpr int kMapGroups = 4;  // CTAs per (map, head) that split the key blocks (at most)

// One head's rows of q or k from the map's first row: row r at p + r * ss, element e at + e * sd;
// vec: rows readable as 16-byte chunks (rows_vectorizable).
template <typename T>
struct HeadRows {
  const T* p;
  int64_t ss, sd;
  bool vec;
};

// How the n keys of a map are split over the CTAs of one head: nkb blocks of 64 keys, kpg blocks per
// CTA, `groups` CTAs. A function of n only, so the row sums' float order (per group, then over the
// groups) is the same for an image and for a segment of the same length, whatever else is in the batch.
struct MapSplit {
  int64_t nkb, kpg, groups;
};

__host__ __device__ inline MapSplit map_split(int64_t n) {
  const int64_t nkb = (n + kTile - 1) / kTile;
  if (nkb == 0) return MapSplit{0, 0, 0};
  const int64_t kpg = (nkb + kMapGroups - 1) / kMapGroups;
  return MapSplit{nkb, kpg, (nkb + kpg - 1) / kpg};
}

// ---------------------------------------------------------------------------------------------
// lse2[i] = log2 sum_{s<S} 2^(c2 * q_i . k_s) for the nq <= 64 queries q[0 .. nq) of one head
// ---------------------------------------------------------------------------------------------

// A CTA of kMapThreads streams all S keys in double-buffered tiles (dynamic shared memory: three
// tiles of tg). Warp w owns query rows 16 w .. 16 w + 15 and all 64 keys of a tile; each lane keeps an
// online (max, sum) for its two rows over its own columns, and the four lanes of a row merge at the end.
template <typename T>
__device__ void lse_rows(const HeadRows<T>& q, int64_t nq, const HeadRows<T>& k, int64_t S, const TileGeom& tg,
                         float c2, float* out, unsigned char* smem) {
  T* const qs = reinterpret_cast<T*>(smem);
  T* const ks0 = qs + kTile * tg.ld;
  zero_pad(qs, 3 * kTile, tg.ld, tg.d, tg.dpad);
  const int warp = static_cast<int>(threadIdx.x) / kWarp, lane = static_cast<int>(threadIdx.x) & (kWarp - 1);
  const int g = lane >> 2, t = lane & 3;
  const int64_t nkb = (S + kTile - 1) / kTile;

  load_tile<T>(qs, tg.ld, q.p, q.ss, q.sd, nq, tg.d, q.vec);
  load_tile<T>(ks0, tg.ld, k.p, k.ss, k.sd, min64(kTile, S), tg.d, k.vec);
  cp_async_commit();
  float m[2] = {-INFINITY, -INFINITY}, s[2] = {0.0f, 0.0f};
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t j0 = kb * kTile;
    const T* cur = ks0 + (kb & 1) * kTile * tg.ld;
    if (kb + 1 < nkb) {
      load_tile<T>(ks0 + ((kb + 1) & 1) * kTile * tg.ld, tg.ld, k.p + (j0 + kTile) * k.ss, k.ss, k.sd,
                   min64(kTile, S - j0 - kTile), tg.d, k.vec);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    float acc[1][8][4];
    warp_logits<T, 1, 8>(qs, cur, tg.ld, tg.d, tg.dpad, 16 * warp, 0, acc);
    lse_tile_update(acc, j0, S, t, c2, m, s);
    __syncthreads();  // cur is overwritten by the next prefetch
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    lse_merge_row(m[hr], s[hr]);
    const int64_t i = 16 * warp + g + 8 * hr;
    if (t == 0 && i < nq) out[i] = m[hr] + log2f(s[hr]);
  }
}

// ---------------------------------------------------------------------------------------------
// Column (and row) sums of p_ij = 2^(c2 l_ij - lse2_i) over the n x n block of one head, key
// blocks [kb0, kb1)
// ---------------------------------------------------------------------------------------------

// For each 64-key block (kept in shared memory) the CTA (kMapThreads, dynamic shared memory: three
// tiles of tg) streams the n queries in double-buffered 64-row tiles. Warps form 2 x 2 (query rows x
// key columns) of 32 x 32. Column sums stay in registers across the query tiles, in tile order, then
// fold over the 8 lanes of a column and the 2 row warps: complete per CTA, so colmean = sum / n goes
// straight through fx into an int64 atomic on col[j] (the head sum; col zeroed before). Row sums of
// a tile fold over the 4 lanes of a row; they are complete only over all key blocks, so column warp
// wc accumulates its own key blocks, in order, in the slot rows0 + wc * slot_stride (rows0 null: no
// row sums), and row_sum_fx adds the slots of all groups.
template <typename T>
__device__ void prob_map_keys(const HeadRows<T>& q, const HeadRows<T>& k, int64_t n, int64_t kb0, int64_t kb1,
                              const LseRow& lse, const TileGeom& tg, float c2, int64_t* col, float* rows0,
                              int64_t slot_stride, unsigned char* smem) {
  __shared__ float s_col[2][kTile];
  T* const ks = reinterpret_cast<T*>(smem);
  T* const qs0 = ks + kTile * tg.ld;
  zero_pad(ks, 3 * kTile, tg.ld, tg.d, tg.dpad);
  const int warp = static_cast<int>(threadIdx.x) / kWarp, lane = static_cast<int>(threadIdx.x) & (kWarp - 1);
  const int wr = warp >> 1, wc = warp & 1;
  const int g = lane >> 2, t = lane & 3;
  const int64_t nqb = (n + kTile - 1) / kTile;
  float* rows_out = rows0 != nullptr ? rows0 + wc * slot_stride : nullptr;

  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * kTile;
    load_tile<T>(ks, tg.ld, k.p + j0 * k.ss, k.ss, k.sd, min64(kTile, n - j0), tg.d, k.vec);
    load_tile<T>(qs0, tg.ld, q.p, q.ss, q.sd, min64(kTile, n), tg.d, q.vec);
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
      const T* cur = qs0 + (qb & 1) * kTile * tg.ld;
      if (qb + 1 < nqb) {
        load_tile<T>(qs0 + ((qb + 1) & 1) * kTile * tg.ld, tg.ld, q.p + (i0 + kTile) * q.ss, q.ss, q.sd,
                     min64(kTile, n - i0 - kTile), tg.d, q.vec);
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
          lse2[mt][hr] = rv[mt][hr] ? lse.at(i) : 0.0f;
          // Only this thread wrote rows_out[i] of this slot (at the previous key block).
          old[mt][hr] = rows_out != nullptr && t == 0 && rv[mt][hr] && kb > kb0 ? rows_out[i] : 0.0f;
        }
      }
      cp_async_wait<1>();
      __syncthreads();
      float acc[2][4][4];
      warp_logits<T, 2, 4>(cur, ks, tg.ld, tg.d, tg.dpad, 32 * wr, 32 * wc, acc);
      float rowacc[2][2] = {};
      prob_tile_sums(acc, c2, lse2, rv, cv, colacc, rowacc);
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
        atomicAdd(reinterpret_cast<ull*>(col + j), static_cast<ull>(fx(mean)));
      }
    }
  }
}

// row_i = sum_h fx((sum over the slots of part[slot * slot_stride + h * head_stride + i]) / n), slots in
// order: the row sums prob_map_keys left in 2 * groups slots per head.
__device__ __forceinline__ int64_t row_sum_fx(const float* part, int64_t slots, int64_t slot_stride,
                                              int64_t head_stride, int64_t H, int64_t n, int64_t i) {
  int64_t acc = 0;
  for (int64_t h = 0; h < H; ++h) {
    float s = 0.0f;
    for (int64_t sl = 0; sl < slots; ++sl) s += part[sl * slot_stride + h * head_stride + i];
    acc += fx(s / static_cast<float>(n));
  }
  return acc;
}

}  // namespace
}  // namespace fopru
