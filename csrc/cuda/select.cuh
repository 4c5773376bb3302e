// Device building blocks of the exact selection and the row gather, shared by the CUDA kernels of
// prune_tokens.cu (significance / select / prune_tokens) and prune_tokens_varlen.cu, plus the host
// helpers their launchers share. Everything sits in an anonymous namespace: each .cu file compiles
// its own copy (no relocatable device code needed), and no symbol leaves the library.
//
// Selection is threshold-then-compact: an 8-bit radix select finds the K-th largest order key,
// then one block scan per chunk of items ranks the strictly greater and the equal keys in index
// order, so the indices come out ascending with lowest-index ties and need no sort. The item
// source is a template parameter (keys in shared memory, keys in global memory, keys computed on
// the fly): anything with `uint64_t key(int64_t i) const`.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "fopru.h"

namespace fopru {
namespace {

using ull = unsigned long long;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kSelectThreads = 512;  // selection + gather CTAs
constexpr int64_t kMaxSlots = 8192;     // selected items one selection CTA records (32 KiB)
constexpr int64_t kMinGatherRows = 16;  // one kept row per warp at least
constexpr int64_t kMinGatherBytes = 32 * 1024;
constexpr int64_t kSmemReserve = 5120;  // static shared memory (SelectShared: 3.8 KiB on sm_90) and margin
// Indices and counts inside a CTA are 32-bit; N stays well below 2^31 in any real model.
constexpr int64_t kMaxTokens = (int64_t{1} << 31) - (int64_t{1} << 16);

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & (kWarp - 1); }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) / kWarp; }
__device__ __forceinline__ int num_warps() { return static_cast<int>(blockDim.x) / kWarp; }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename V>
__device__ __forceinline__ V warp_inclusive_scan(V v) {
  const int lane = lane_id();
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const V t = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Block-level building blocks of the selection (blockDim.x a multiple of 32, all threads call)
// ---------------------------------------------------------------------------------------------

struct SelectShared {
  unsigned hist[256];
  ull warp_total[kWarp];
  ull warp_prefix[kWarp];
  ull warp_lo[kWarp];
  ull warp_hi[kWarp];
  FocalSums focal[kSelectThreads / kWarp];  // per-warp partials of the focal rule's sums
  ull lo, hi;
  ull prefix;
  int64_t need;
};

// Selection items (tokens for rank, grid rows for row) as a strided int64 array in shared or
// global memory, compared by their order key.
struct Items {
  const int64_t* ptr;
  int64_t stride;
  __device__ __forceinline__ uint64_t key(int64_t i) const { return order_key(ptr[i * stride]); }
};

// Exclusive prefix sum over the block in thread order, and the block total.
__device__ ull block_exclusive_scan(ull v, ull& total, SelectShared& sh) {
  const int lane = lane_id(), warp = warp_id(), nw = num_warps();
  const ull incl = warp_inclusive_scan(v);
  if (lane == kWarp - 1) sh.warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const ull t = lane < nw ? sh.warp_total[lane] : 0ull;
    sh.warp_prefix[lane] = warp_inclusive_scan(t);
  }
  __syncthreads();
  // The next call writes warp_total before and warp_prefix after its first barrier: no hazard.
  total = sh.warp_prefix[nw - 1];
  return incl - v + (warp > 0 ? sh.warp_prefix[warp - 1] : 0ull);
}

// Min and max over the warp (butterfly: every lane ends with both). Whole warps only.
__device__ __forceinline__ void warp_min_max(uint64_t& mn, uint64_t& mx) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const uint64_t a = __shfl_xor_sync(kFullMask, static_cast<ull>(mn), o);
    const uint64_t b = __shfl_xor_sync(kFullMask, static_cast<ull>(mx), o);
    mn = a < mn ? a : mn;
    mx = b > mx ? b : mx;
  }
}

// Smallest and largest key of the m >= 1 items.
template <typename It>
__device__ void block_key_range(It items, int64_t m, uint64_t& lo, uint64_t& hi, SelectShared& sh) {
  uint64_t mn = ~0ull, mx = 0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const uint64_t key = items.key(i);
    mn = key < mn ? key : mn;
    mx = key > mx ? key : mx;
  }
  warp_min_max(mn, mx);
  if (lane_id() == 0) {
    sh.warp_lo[warp_id()] = mn;
    sh.warp_hi[warp_id()] = mx;
  }
  __syncthreads();
  if (warp_id() == 0) {
    mn = lane_id() < num_warps() ? sh.warp_lo[lane_id()] : ~0ull;
    mx = lane_id() < num_warps() ? sh.warp_hi[lane_id()] : 0ull;
    warp_min_max(mn, mx);
    if (lane_id() == 0) {
      sh.lo = mn;
      sh.hi = mx;
    }
  }
  __syncthreads();
  lo = sh.lo;  // written once per kernel
  hi = sh.hi;
}

// The k-th largest key (1 <= k <= m) by 8-bit radix select from the top digit down, and how many
// items equal to it belong to the top k (the rest of the top k are strictly greater). The digits
// that all keys share (the common prefix of the smallest and largest key) need no pass.
template <typename It>
__device__ void radix_select(It items, int64_t m, int64_t k, uint64_t& threshold, int64_t& need,
                             SelectShared& sh) {
  const int lane = lane_id();
  uint64_t lo, hi;
  block_key_range(items, m, lo, hi, sh);
  const int top = lo == hi ? -1 : (63 - __clzll(static_cast<long long>(lo ^ hi))) / 8;  // highest differing digit
  uint64_t mask = top == 7 ? 0ull : ~0ull << (8 * (top + 1));
  uint64_t prefix = lo & mask;
  int64_t rem = k;
  for (int shift = 8 * top; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    for (int64_t base = 0; base < m; base += blockDim.x) {  // uniform trip count: full warps below
      const int64_t i = base + threadIdx.x;
      unsigned bin = 256;  // no bin
      if (i < m) {
        const uint64_t key = items.key(i);
        if ((key & mask) == prefix) bin = static_cast<unsigned>(key >> shift) & 255u;
      }
      // Skewed keys (e.g. all positive) hit one bin: one atomic per distinct bin per warp.
      const unsigned peers = __match_any_sync(kFullMask, bin);
      if (bin < 256 && lane == __ffs(peers) - 1) atomicAdd(&sh.hist[bin], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    if (warp_id() == 0) {
      // Lane l holds bins 255 - 8l down to 248 - 8l: a scan over lanes counts from the top bin.
      unsigned c[8];
      unsigned s = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        c[e] = sh.hist[255 - 8 * lane - e];
        s += c[e];
      }
      const unsigned incl = warp_inclusive_scan(s);
      const unsigned excl = incl - s;
      const unsigned r = static_cast<unsigned>(rem);
      if (excl < r && r <= incl) {  // exactly one lane
        unsigned acc = excl;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (acc + c[e] >= r) {
            sh.prefix = prefix | (static_cast<uint64_t>(255 - 8 * lane - e) << shift);
            sh.need = static_cast<int64_t>(r - acc);
            break;
          }
          acc += c[e];
        }
      }
    }
    __syncthreads();
    prefix = sh.prefix;  // rewritten only after the next pass's second barrier
    rem = sh.need;
    mask |= uint64_t{0xff} << shift;
  }
  threshold = prefix;
  need = rem;
}

// Ranks the selected items in index order: item i is kept when key > threshold, or key ==
// threshold and fewer than `need` equal keys precede it. Records the kept items whose rank lies
// in [p0, p1] in slots[rank - p0].
template <typename It>
__device__ void compact(It items, int64_t m, uint64_t threshold, int64_t need, int64_t p0, int64_t p1,
                        int32_t* slots, SelectShared& sh) {
  int64_t gt_done = 0, eq_done = 0;  // uniform across the block
  for (int64_t base = 0; base < m; base += blockDim.x) {
    if (gt_done + min64(eq_done, need) > p1) break;  // every wanted rank is recorded
    const int64_t i = base + threadIdx.x;
    unsigned gt = 0, eq = 0;
    if (i < m) {
      const uint64_t key = items.key(i);
      gt = key > threshold;
      eq = key == threshold;
    }
    // Both counts in one scan: equal keys in the high half, greater keys in the low half.
    ull total;
    const ull before = block_exclusive_scan((static_cast<ull>(eq) << 32) | gt, total, sh);
    const int64_t gt_before = gt_done + static_cast<int64_t>(before & 0xffffffffull);
    const int64_t eq_before = eq_done + static_cast<int64_t>(before >> 32);
    if (gt || (eq && eq_before < need)) {
      const int64_t rank = gt_before + min64(eq_before, need);
      if (rank >= p0 && rank <= p1) slots[rank - p0] = static_cast<int32_t>(i);
    }
    gt_done += static_cast<int64_t>(total & 0xffffffffull);
    eq_done += static_cast<int64_t>(total >> 32);
  }
}

// ---------------------------------------------------------------------------------------------
// Gather: pruned[b, k] = tokens[b, idx[b, k]] as raw bytes
// ---------------------------------------------------------------------------------------------

struct GatherSpec {
  const unsigned char* tok;
  int64_t sb, sn, step;  // bytes: image stride, token stride, stride between copy units of a row
  unsigned char* out;    // pruned (B, K, D), contiguous
  int64_t row_bytes, units;
  int unit;  // bytes per copy unit (16, 8, 4 or 2); 0: no gather
};

__device__ __forceinline__ int64_t token_at(int64_t k, const int32_t* slots, int64_t p0, int64_t w) {
  const int64_t p = k / w;
  return static_cast<int64_t>(slots[p - p0]) * w + (k - p * w);
}

// One warp per kept row, four units per lane in flight.
template <typename U>
__device__ void gather_rows(const GatherSpec& g, int64_t b, int64_t k0, int64_t k1, int64_t K,
                            const int32_t* slots, int64_t p0, int64_t w) {
  const int lane = lane_id();
  const unsigned char* img = g.tok + b * g.sb;
  for (int64_t k = k0 + warp_id(); k < k1; k += num_warps()) {
    const unsigned char* src = img + token_at(k, slots, p0, w) * g.sn;
    U* dst = reinterpret_cast<U*>(g.out + (b * K + k) * g.row_bytes);
    for (int64_t e = lane; e < g.units; e += 4 * kWarp) {
      U v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t u = e + j * kWarp;
        if (u < g.units) v[j] = *reinterpret_cast<const U*>(src + u * g.step);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t u = e + j * kWarp;
        if (u < g.units) dst[u] = v[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Ctx {
  cudaStream_t stream;
  int sms;
  int64_t smem_limit;  // dynamic shared memory a selection CTA may use
  at::TensorOptions long_opts;
};

Ctx make_ctx(const at::Tensor& like) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> sms_cache{};
  static std::array<std::atomic<int>, kMaxDevices> smem_cache{};
  const int dev = like.get_device();
  int sms = dev < kMaxDevices ? sms_cache[dev].load(std::memory_order_relaxed) : 0;
  int smem = dev < kMaxDevices ? smem_cache[dev].load(std::memory_order_relaxed) : 0;
  if (sms == 0 || smem == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (dev < kMaxDevices) {
      sms_cache[dev].store(sms, std::memory_order_relaxed);
      smem_cache[dev].store(smem, std::memory_order_relaxed);
    }
  }
  return Ctx{c10::cuda::getCurrentCUDAStream(dev).stream(), sms, static_cast<int64_t>(smem) - kSmemReserve,
             like.options().dtype(at::kLong)};
}

// Test hook: FOPRU_CUDA_FORCE_GLOBAL_KEYS=1 sends every selection down the global-memory path.
bool force_global_keys() {
  const char* v = std::getenv("FOPRU_CUDA_FORCE_GLOBAL_KEYS");
  return v != nullptr && v[0] == '1';
}

// Above 48 KiB of static + dynamic shared memory a kernel must opt in. The opt-in is always the
// device's whole limit (bytes <= limit), never this launch's size: the attribute is per kernel and
// device, not per stream, so a smaller value set by another host thread between its
// cudaFuncSetAttribute and its launch would make a concurrent larger launch fail.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int64_t bytes, int64_t limit) {
  if (bytes + kSmemReserve > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
  }
}

// Copy plan of the gather: 16/8/4/2-byte units where every row start is aligned, element by
// element for a strided innermost dimension.
GatherSpec gather_spec(const at::Tensor& tokens, const at::Tensor& pruned) {
  GatherSpec g{};
  const int64_t es = tokens.element_size();
  const int64_t B = tokens.size(0), N = tokens.size(1), D = tokens.size(2);
  g.row_bytes = D * es;
  if (g.row_bytes == 0) return g;  // unit 0: nothing to copy
  g.tok = static_cast<const unsigned char*>(tokens.data_ptr());
  g.out = static_cast<unsigned char*>(pruned.data_ptr());
  g.sb = tokens.stride(0) * es;
  g.sn = tokens.stride(1) * es;
  if (D == 1 || tokens.stride(2) == 1) {
    const auto src = reinterpret_cast<uintptr_t>(g.tok), dst = reinterpret_cast<uintptr_t>(g.out);
    for (int64_t u : {int64_t{16}, int64_t{8}, int64_t{4}, int64_t{2}}) {
      const bool ok = src % u == 0 && dst % u == 0 && g.row_bytes % u == 0 && (B <= 1 || g.sb % u == 0) &&
                      (N <= 1 || g.sn % u == 0);
      if (ok || u == es) {  // element-sized units always fit
        g.unit = static_cast<int>(u);
        break;
      }
    }
    g.step = g.unit;
  } else {
    g.unit = static_cast<int>(es);
    g.step = tokens.stride(2) * es;
  }
  g.units = g.row_bytes / g.unit;
  return g;
}

}  // namespace
}  // namespace fopru
