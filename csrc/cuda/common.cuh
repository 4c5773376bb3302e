// Helpers every CUDA kernel file of the library shares, defined once: warp constants and lane
// arithmetic, the host's launch context (stream, SM count, shared-memory limit, cached per device)
// and the shared-memory opt-in. The device code sits in an anonymous namespace: each .cu file
// compiles its own copy (no relocatable device code needed) and no symbol leaves the library.
//
// Every kernel needs compute capability 8.0 or newer: cp.async, mma.sync m16n8k16 with bf16
// inputs (the q/k tiles) and __match_any_sync (the selection) are sm_80 / sm_70 features, and the
// build refuses FOPRU_CUDA_ARCHS below 80 (setup.py, CMakeLists.txt). The #error below catches any
// other route to an older target.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>
#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fopru's CUDA kernels need compute capability 8.0 or newer (cp.async, bf16 mma.sync): build with FOPRU_CUDA_ARCHS of 80 or above"
#endif

namespace fopru {
namespace {

using ull = unsigned long long;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxDevices = 64;  // per-device caches below; devices past it query every time

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

// The last i in [0, count) with a[i] <= x, for a non-decreasing a with a[0] <= x (binary search): the
// owner of item x when a[i] is owner i's first item (an owner of no items shares its start with the
// next, and the search passes it over).
__device__ __forceinline__ int64_t last_at_most(const int64_t* a, int64_t count, int64_t x) {
  int64_t i = 0;
  for (int64_t hi = count; hi - i > 1;) {
    const int64_t mid = (i + hi) / 2;
    if (a[mid] <= x) {
      i = mid;
    } else {
      hi = mid;
    }
  }
  return i;
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What a launcher needs of the device of its tensors. smem_limit is the dynamic shared memory one
// CTA of this kernel family may use: the device's opt-in maximum less smem_reserve, the family's
// static shared memory and a margin.
struct Ctx {
  cudaStream_t stream;
  int device;
  int sms;
  int64_t smem_reserve;
  int64_t smem_limit;
  at::TensorOptions opts;  // the tensors' device (at::empty(..., ctx.opts.dtype(...)))
};

// The device attributes are read once per device and cached (lock-free: racing first calls read
// the same values).
inline Ctx make_ctx(const at::Tensor& like, int64_t smem_reserve) {
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
  return Ctx{c10::cuda::getCurrentCUDAStream(dev).stream(), dev, sms, smem_reserve,
             static_cast<int64_t>(smem) - smem_reserve, like.options()};
}

// Above 48 KiB of static + dynamic shared memory a kernel must opt in. The opt-in is always the
// family's whole limit (bytes <= ctx.smem_limit, which the caller checks), never this launch's
// size: the attribute is per kernel and device, not per stream, so a smaller value set by another
// host thread between its cudaFuncSetAttribute and its launch would make a concurrent larger launch
// fail. Since the value never changes, it is set once per kernel and device: the template
// parameter gives every kernel its own flags, and two threads racing on the first launch both set
// the same value, which is harmless.
template <auto Kernel>
void allow_dynamic_smem(int64_t bytes, const Ctx& ctx) {
  if (bytes + ctx.smem_reserve <= 48 * 1024) return;
  static std::array<std::atomic<bool>, kMaxDevices> done{};
  const bool cached = ctx.device < kMaxDevices;
  if (cached && done[ctx.device].load(std::memory_order_acquire)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(ctx.smem_limit)));
  if (cached) done[ctx.device].store(true, std::memory_order_release);
}

}  // namespace
}  // namespace fopru
