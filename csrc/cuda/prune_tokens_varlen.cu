// CUDA kernel of fopru::prune_tokens_varlen (SPEC.md "Ragged batches"), registered for the CUDA key.
//
// Launch plan: one launch of _varlen_select_gather_kernel per kMaxImages images (one launch for
// any usual batch). Image b gets ceil(keep[b] / kc) CTAs; each CTA reads cu_seqlens[b], [b + 1]
// itself, checks the segment, re-runs its image's selection (select.cuh, as _select_gather_kernel
// does) and gathers its own chunk of kc kept rows. The per-image launch data (output offsets,
// CTA offsets, grids) travel as one kernel parameter: no host-to-device copy, no sync, and CUDA
// graphs capture them with the launch. The host never reads cu_seqlens (that would cost a sync),
// so every CTA validates its segment and an invalid one yields idx = -1 and zero rows.
//
// Keys (tokens for rank, grid rows for row) sit in shared memory when an image's keys fit the
// launch's capacity; otherwise every pass reads them from the significance in global memory (L2),
// rows summed on the fly. Any n_b up to kMaxTokens works (e.g. 16384 tokens per image from
// dynamic-resolution encoders); each CTA of an image pays one selection over its n_b keys.
//
// prune_tokens_qk_varlen (cuda/significance_qk_varlen.cu) runs the same launches on the significance it
// computes, through prune_segments_cuda (stages.h): its selection segments may be cu_seqlens / group
// (`divisor`), and a device flag marks them all invalid when its attention segments were.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string_view>
#include <tuple>

#include "common.cuh"
#include "fopru.h"
#include "ops.h"
#include "select.cuh"
#include "stages.h"

namespace fopru {
namespace {

// Images per launch. Their launch data is 32 * kMaxImages bytes of kernel parameters, past the
// 4 KiB that CUDA allowed before 12.1: CUDA 12.1+ allows 32,764 bytes on sm_70+ (with a driver of
// the 12.1 generation or newer, which any CUDA 12 build of torch needs anyway). setup.py and
// CMakeLists.txt refuse older toolkits, and so does the #error below. A smaller block keeps the
// launch of the usual few-image batch cheap.
constexpr int64_t kMaxImages = 256;
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ < 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ < 1))
#error "fopru's ragged-batch kernel passes more than 4 KiB of kernel parameters: it needs CUDA 12.1 or newer"
#endif

// Per-image launch data of images [first, first + count) of the batch, passed by value and read in
// place from the parameter bank (__grid_constant__: never copied to local memory).
struct VarlenImages {
  int64_t first, count;
  int64_t cta_start[kMaxImages + 1];   // CTAs of image first + i: [cta_start[i], cta_start[i + 1])
  int64_t keep_start[kMaxImages + 1];  // its rows of the outputs: [keep_start[i], keep_start[i + 1])
  int64_t cols[kMaxImages];            // W: grid cols for row, 1 for rank
  int64_t rows[kMaxImages];            // grid rows for row (n_b must be rows * cols); unused for rank
};

struct VarlenSpec {
  const void* cu;  // cu_seqlens (B + 1,), int32 or int64, element stride cu_stride
  int64_t cu_stride;
  bool cu64;
  int64_t divisor;         // image b owns tokens [cu[b] / divisor, cu[b + 1] / divisor)
  const int64_t* invalid;  // device flag: non-zero makes every image invalid; null: none
  void* cu_out;  // cu_seqlens_out (B + 1,), contiguous, cu_seqlens' dtype
  int64_t T;
  const int64_t* sig;  // (T,), element stride sig_stride
  int64_t sig_stride;
  bool by_row;
  int64_t kc;       // kept tokens per CTA
  int64_t key_cap;  // keys an image may hold in shared memory (0: every image reads global keys)
  GatherSpec g;     // tokens as one image (1, T, D) -> pruned (total, D)
  int64_t* idx;     // (total,)
};
static_assert(sizeof(VarlenImages) + sizeof(VarlenSpec) <= 32764, "kernel parameters beyond CUDA 12.1's 32,764 bytes");


// Keys read from the significance in global memory (L2): item i is the int64 sum of the w tokens
// of grid row i (w == 1: the token itself, rank). Unsigned sums wrap like torch's int64 sum.
struct RowSumItems {
  const int64_t* ptr;
  int64_t stride, w;
  __device__ __forceinline__ uint64_t key(int64_t i) const {
    if (w == 1) return order_key(ptr[i * stride]);
    ull acc = 0;
    for (int64_t x = 0; x < w; ++x) acc += static_cast<ull>(ptr[(i * w + x) * stride]);
    return order_key(static_cast<int64_t>(acc));
  }
};

// The same m keys as RowSumItems into shared memory: a thread per row for narrow rows, a warp per
// row for wide ones. All threads call; the caller synchronises before reading.
__device__ void load_keys(const RowSumItems& src, int64_t m, int64_t* keys) {
  if (src.w < kWarp) {
    for (int64_t y = threadIdx.x; y < m; y += blockDim.x) {
      ull acc = 0;
      for (int64_t x = 0; x < src.w; ++x) acc += static_cast<ull>(src.ptr[(y * src.w + x) * src.stride]);
      keys[y] = static_cast<int64_t>(acc);
    }
    return;
  }
  for (int64_t y = warp_id(); y < m; y += num_warps()) {
    ull acc = 0;
    for (int64_t x = lane_id(); x < src.w; x += kWarp) acc += static_cast<ull>(src.ptr[(y * src.w + x) * src.stride]);
    acc = warp_sum(acc);
    if (lane_id() == 0) keys[y] = static_cast<int64_t>(acc);
  }
}

// Zero output rows [k0, k1) of an invalid image (g.out already points at the image's first row).
template <typename U>
__device__ void zero_rows(const GatherSpec& g, int64_t k0, int64_t k1) {
  for (int64_t k = k0 + warp_id(); k < k1; k += num_warps()) {
    U* dst = reinterpret_cast<U*>(g.out + k * g.row_bytes);
    for (int64_t e = lane_id(); e < g.units; e += kWarp) dst[e] = U{};
  }
}

// Image b's first token (cu_seqlens[b] / divisor).
__device__ __forceinline__ int64_t load_cu(const VarlenSpec& s, int64_t b) {
  const int64_t v = s.cu64 ? static_cast<const int64_t*>(s.cu)[b * s.cu_stride]
                           : static_cast<int64_t>(static_cast<const int32_t*>(s.cu)[b * s.cu_stride]);
  return s.divisor == 1 ? v : v / s.divisor;
}

// One CTA per (image, chunk of kc kept rows); CTA 0 also writes cu_seqlens_out of its images.
// Dynamic shared memory: [keys: key_cap int64][slots: int32, enough for kc / W + 2 kept items].
__global__ void __launch_bounds__(kSelectThreads)
    _varlen_select_gather_kernel(const __grid_constant__ VarlenImages im, const VarlenSpec s) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ SelectShared sh;
  const int64_t bid = blockIdx.x;
  if (bid == 0) {
    for (int64_t j = threadIdx.x; j <= im.count; j += blockDim.x) {
      const int64_t v = im.keep_start[j];
      if (s.cu64) {
        static_cast<int64_t*>(s.cu_out)[im.first + j] = v;
      } else {
        static_cast<int32_t*>(s.cu_out)[im.first + j] = static_cast<int32_t>(v);
      }
    }
  }
  if (bid >= im.cta_start[im.count]) return;  // the lone CTA of a launch whose images keep nothing

  // This CTA's image: the last i with cta_start[i] <= bid (an image keeping nothing owns no CTA).
  const int64_t i = last_at_most(im.cta_start, im.count, bid);
  const int64_t b = im.first + i;
  const int64_t out0 = im.keep_start[i];
  const int64_t K = im.keep_start[i + 1] - out0;
  const int64_t W = im.cols[i];
  const int64_t k0 = (bid - im.cta_start[i]) * s.kc;  // < K
  const int64_t k1 = min64(k0 + s.kc, K);
  GatherSpec g = s.g;
  g.out += out0 * g.row_bytes;

  // The segment, checked here because the host never reads it: in bounds, keep <= n, grid = n.
  const int64_t c0 = load_cu(s, b), c1 = load_cu(s, b + 1);
  bool ok = (s.invalid == nullptr || *s.invalid == 0) && c0 >= 0 && c0 <= c1 && c1 <= s.T;
  const int64_t n = ok ? c1 - c0 : 0;
  ok = ok && K <= n && (!s.by_row || (n % W == 0 && n / W == im.rows[i]));
  if (!ok) {  // uniform across the CTA
    for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) s.idx[out0 + k] = -1;
    with_unit(g, [&](auto u) { zero_rows<decltype(u)>(g, k0, k1); });
    return;
  }

  const int64_t m = n / W;  // items: tokens (W = 1) or grid rows, m >= K / W >= 1
  const int64_t p0 = k0 / W, p1 = (k1 - 1) / W;  // kept items (ranks) this chunk covers
  const RowSumItems global_items{s.sig + c0 * s.sig_stride, s.sig_stride, W};
  int32_t* slots = reinterpret_cast<int32_t*>(smem + s.key_cap * static_cast<int64_t>(sizeof(int64_t)));
  uint64_t threshold;
  int64_t need;
  if (m <= s.key_cap) {  // uniform branch
    int64_t* keys = reinterpret_cast<int64_t*>(smem);
    load_keys(global_items, m, keys);
    __syncthreads();
    const Items items{keys, 1};
    radix_select(items, m, K / W, threshold, need, sh);
    compact(items, m, threshold, need, p0, p1, slots, sh);
  } else {
    radix_select(global_items, m, K / W, threshold, need, sh);
    compact(global_items, m, threshold, need, p0, p1, slots, sh);
  }
  __syncthreads();
  for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) s.idx[out0 + k] = c0 + token_at(k, slots, p0, W);
  g.tok += c0 * g.sn;
  with_unit(g, [&](auto u) { gather_rows<decltype(u)>(g, 0, k0, k1, 0, slots, p0, W); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_segments_cuda(const at::Tensor& tokens, const at::Tensor& sig,
                                                                   const at::Tensor& cu_seqlens, int64_t divisor,
                                                                   at::OptionalIntArrayRef grids, const int64_t* invalid,
                                                                   const VarlenArgs& a) {
  const c10::cuda::CUDAGuard guard(tokens.device());
  at::Tensor pruned = at::empty({a.total, a.D}, tokens.options());
  at::Tensor idx = at::empty({a.total}, tokens.options().dtype(at::kLong));
  if (a.B == 0 || a.total == 0) return {pruned, idx, at::zeros({a.B + 1}, cu_seqlens.options())};
  at::Tensor cu_out = at::empty({a.B + 1}, cu_seqlens.options());
  TORCH_CHECK(a.T <= kMaxTokens, "fopru: T = ", a.T, " tokens exceeds the CUDA kernels' limit of ", kMaxTokens);
  const bool by_row = a.strategy == Strategy::kRow;  // checked: row comes with grids, cols >= 1
  const Ctx ctx = make_ctx(tokens, kSelectSmemReserve);

  VarlenSpec s{};
  s.cu = cu_seqlens.const_data_ptr();
  s.cu_stride = cu_seqlens.stride(0);
  s.cu64 = cu_seqlens.scalar_type() == at::kLong;
  s.divisor = divisor;
  s.invalid = invalid;
  s.cu_out = cu_out.mutable_data_ptr();
  s.T = a.T;
  s.sig = sig.const_data_ptr<int64_t>();
  s.sig_stride = sig.stride(0);
  s.by_row = by_row;
  s.g = gather_spec(tokens.unsqueeze(0), pruned.unsqueeze(0));
  s.idx = idx.mutable_data_ptr<int64_t>();

  // Enough CTAs for the gather, each with enough rows to be worth its selection (as prune_tokens).
  const int64_t max_keep = *std::max_element(a.keep.begin(), a.keep.end());
  s.kc = std::max({kMinGatherRows, ceil_div(kMinGatherBytes, std::max<int64_t>(s.g.row_bytes, 1)),
                   ceil_div(a.total, 2 * static_cast<int64_t>(ctx.sms))});
  s.kc = std::min({s.kc, max_keep, kMaxSlots - 2});
  int64_t slots = 0, max_rows = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    if (a.keep[b] == 0) continue;
    slots = std::max(slots, std::min(s.kc, a.keep[b]) / a.cols[b] + 2);
    if (by_row && (*grids)[2 * b] <= a.T) max_rows = std::max(max_rows, (*grids)[2 * b]);
  }
  const int64_t slot_bytes = 4 * slots;
  // Shared keys: row knows every image's row count; rank only knows T, so images up to twice the
  // mean length keep their keys in shared memory and longer ones read theirs from L2 (a capacity
  // of T for all would cost occupancy on batches of many small images).
  const int64_t want = by_row ? max_rows : std::min(a.T, 2 * ceil_div(a.T, a.B));
  const int64_t budget = std::max<int64_t>(0, (ctx.smem_limit - slot_bytes) / 8);
  s.key_cap = force_global_keys() ? 0 : std::min(want, budget);
  const int64_t smem_bytes = 8 * s.key_cap + slot_bytes;
  allow_dynamic_smem<_varlen_select_gather_kernel>(smem_bytes, ctx);

  VarlenImages im{};
  for (int64_t first = 0; first < a.B; first += kMaxImages) {
    im.first = first;
    im.count = std::min(kMaxImages, a.B - first);
    im.cta_start[0] = 0;
    for (int64_t i = 0; i < im.count; ++i) {
      const int64_t b = first + i;
      im.keep_start[i] = a.keep_start[b];
      im.cols[i] = a.cols[b];
      im.rows[i] = by_row ? (*grids)[2 * b] : 0;
      im.cta_start[i + 1] = im.cta_start[i] + ceil_div(a.keep[b], s.kc);
    }
    im.keep_start[im.count] = a.keep_start[first + im.count];
    const int64_t blocks = std::max<int64_t>(im.cta_start[im.count], 1);  // CTA 0 writes cu_seqlens_out
    TORCH_CHECK(blocks <= INT_MAX, "fopru: too many kept tokens for one launch (", blocks, " CTAs)");
    _varlen_select_gather_kernel<<<static_cast<unsigned>(blocks), kSelectThreads, smem_bytes, ctx.stream>>>(im, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {pruned, idx, cu_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_tokens_varlen_cuda(const at::Tensor& tokens, const at::Tensor& sig,
                                                                        const at::Tensor& cu_seqlens, at::IntArrayRef keep,
                                                                        c10::string_view strategy,
                                                                        at::OptionalIntArrayRef grids) {
  const VarlenArgs a = check_prune_varlen(tokens, sig, cu_seqlens, keep,
                                          std::string_view(strategy.data(), strategy.size()), grids);
  return prune_segments_cuda(tokens, sig, cu_seqlens, 1, grids, nullptr, a);
}

}  // namespace fopru

TORCH_LIBRARY_IMPL(fopru, CUDA, m) { m.impl("prune_tokens_varlen", &fopru::prune_tokens_varlen_cuda); }
