// CPU kernels: significance, selection and gather, one image per task of at::parallel_for.
// Bitwise equal to fopru_kernels/reference.py: the sums are int64 fixed-point, so the loop order
// here (rows of the map streamed once, column sums in an L1-resident buffer) changes nothing.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

#include "../ops.h"
#include "select.h"

namespace fopru {
namespace {

using cpu::for_each_image;
using cpu::select_image;

// float64 rows are multiversioned so AVX-512DQ machines convert double -> int64 eight lanes at a
// time (x86-64-v3 has no packed conversion to int64); the default clone runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FOPRU_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define FOPRU_CLONES
#endif

int64_t fx_row_f32_portable(const float* __restrict r, int64_t n, int64_t* __restrict col) {
  int64_t total = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t v = fx(r[j]);
    col[j] += v;
    total += v;
  }
  return total;
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same loop in AVX-512 intrinsics, 16 values a step: 1.5x the auto-vectorised clone, which
// spends its time on mask-register juggling for the clamp (11 -> 17 GB/s per core on Zen 4: a
// development measurement, no committed harness). NaN -> 0 first, since vmaxps would turn a NaN
// into the clamp bound.
__attribute__((target("avx512f,avx512dq"))) int64_t fx_row_f32_avx512(const float* r, int64_t n, int64_t* col) {
  const __m512 lo = _mm512_set1_ps(-kFxClampF), hi = _mm512_set1_ps(kFxClampF), scale = _mm512_set1_ps(kFxScaleF);
  __m512i total = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t left = n - j;
    const auto m = static_cast<__mmask16>(left >= 16 ? 0xFFFFu : (1u << left) - 1);
    __m512 a = _mm512_maskz_loadu_ps(m, r + j);
    a = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, a, _CMP_ORD_Q), a);
    a = _mm512_mul_ps(_mm512_min_ps(_mm512_max_ps(a, lo), hi), scale);
    const __m512i v0 = _mm512_cvttps_epi64(_mm512_castps512_ps256(a));
    const __m512i v1 = _mm512_cvttps_epi64(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const auto m0 = static_cast<__mmask8>(m), m1 = static_cast<__mmask8>(m >> 8);
    _mm512_mask_storeu_epi64(col + j, m0, _mm512_add_epi64(_mm512_maskz_loadu_epi64(m0, col + j), v0));
    _mm512_mask_storeu_epi64(col + j + 8, m1, _mm512_add_epi64(_mm512_maskz_loadu_epi64(m1, col + j + 8), v1));
    total = _mm512_add_epi64(total, _mm512_add_epi64(v0, v1));
  }
  return _mm512_reduce_add_epi64(total);
}
const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#endif

// One query row of the map: col[j] += fx(r[j]), returns the row's own sum. The hot loop.
int64_t fx_row_f32(const float* r, int64_t n, int64_t* col) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kHasAvx512) return fx_row_f32_avx512(r, n, col);
#endif
  return fx_row_f32_portable(r, n, col);
}

FOPRU_CLONES int64_t fx_row_f64(const double* __restrict r, int64_t n, int64_t* __restrict col) {
  int64_t total = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t v = fx(r[j]);
    col[j] += v;
    total += v;
  }
  return total;
}

#if defined(__x86_64__) && defined(__GNUC__)
// fp16 -> fp32 eight at a time (F16C); exact, like every fp16 -> fp32 conversion.
__attribute__((target("avx2,f16c"))) void widen_half_f16c(const c10::Half* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}
const bool kHasF16C = __builtin_cpu_supports("f16c");
#endif

// A row of 16-bit values (or a strided float row) widened into a contiguous float buffer.
template <typename T>
void widen(const T* r, int64_t stride, int64_t n, float* buf) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (stride == 1 && kHasF16C) return widen_half_f16c(r, n, buf);
  }
#endif
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (stride == 1) {  // bfloat16 is the top half of a float32: a shift, which vectorises
      const auto* bits = reinterpret_cast<const uint16_t*>(r);
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t w = static_cast<uint32_t>(bits[j]) << 16;
        std::memcpy(buf + j, &w, sizeof(float));
      }
      return;
    }
  }
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(r[j * stride]);
}

// The row as contiguous floats: itself when it already is, else widened into buf.
template <typename T>
const float* as_floats(const T* r, int64_t stride, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) return r;
  }
  widen(r, stride, n, buf);
  return buf;
}

template <typename T>
int64_t fx_row(const T* r, int64_t stride, int64_t n, int64_t* col, float* buf) {
  if constexpr (std::is_same_v<T, double>) {
    if (stride == 1) return fx_row_f64(r, n, col);
    int64_t total = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t v = fx(r[j * stride]);
      col[j] += v;
      total += v;
    }
    return total;
  } else {
    return fx_row_f32(as_floats(r, stride, n, buf), n, col);
  }
}

// CLS scores of image b: sig[j] = sum_h fx(attn[b, h, 0, P + j]).
template <typename T>
void cls_image(const at::Tensor& attn, const SigArgs& a, int64_t b, int64_t* sig) {
  const T* patch = attn.const_data_ptr<T>() + b * attn.stride(0) + a.P * attn.stride(3);
  std::vector<float> buf(a.N);
  std::fill(sig, sig + a.N, 0);
  for (int64_t h = 0; h < a.H; ++h) fx_row(patch + h * attn.stride(1), attn.stride(3), a.N, sig, buf.data());
}

// Query rows [i0, i1) of image b, all heads: col[j] += their fx sums (a partial of the received
// scores), row[i] = the attention each of those queries pays. Rows are disjoint between tasks.
template <typename T>
void map_rows(const at::Tensor& attn, const SigArgs& a, int64_t b, int64_t i0, int64_t i1, int64_t* col,
              int64_t* row) {
  const int64_t sh = attn.stride(1), sq = attn.stride(2), ss = attn.stride(3);
  const T* patch = attn.const_data_ptr<T>() + b * attn.stride(0) + a.P * ss + a.P * sq;
  std::vector<float> buf(a.N);
  std::fill(col, col + a.N, 0);
  std::fill(row + i0, row + i1, 0);
  for (int64_t h = 0; h < a.H; ++h) {
    for (int64_t i = i0; i < i1; ++i) row[i] += fx_row(patch + h * sh + i * sq, ss, a.N, col, buf.data());
  }
}

// Sums the partial column sums of image b into sig and applies the focal variance rule.
void finish_map(const SigArgs& a, const int64_t* partials, int64_t chunks, const int64_t* row, int64_t* sig) {
  std::copy(partials, partials + a.N, sig);
  for (int64_t c = 1; c < chunks; ++c) {
    for (int64_t j = 0; j < a.N; ++j) sig[j] += partials[c * a.N + j];
  }
  if (a.score == Score::kReceived) return;
  if (!cpu::focal_prefers_col(sig, row, a.N)) std::copy(row, row + a.N, sig);
}

// pruned[b, k, :] = tokens[b, idx[k], :].
void gather_image(const at::Tensor& tokens, int64_t b, const int64_t* idx, int64_t keep, char* out) {
  const int64_t es = tokens.element_size();
  const char* base = static_cast<const char*>(tokens.const_data_ptr()) + b * tokens.stride(0) * es;
  cpu::gather_rows(base, tokens.stride(1) * es, tokens.stride(2) * es, es, tokens.size(2), idx, keep, out);
}

void significance_into(const at::Tensor& attn, const SigArgs& a, at::Tensor& sig) {
  int64_t* out = sig.data_ptr<int64_t>();
  if (a.B == 0 || a.N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "fopru_significance", [&] {
    if (a.score == Score::kCls) {
      for_each_image(a.B, [&](int64_t b) { cls_image<scalar_t>(attn, a, b, out + b * a.N); });
      return;
    }
    // Full maps: with fewer images than threads, split each image's query rows into chunks so
    // B = 1 uses every core; integer partial sums make the split invisible in the result.
    const int64_t threads = at::get_num_threads();
    const int64_t chunks = std::min<int64_t>(a.N, a.B >= threads ? 1 : (threads + a.B - 1) / a.B);
    std::vector<int64_t> partials(a.B * chunks * a.N), rows(a.B * a.N);
    at::parallel_for(0, a.B * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / chunks, c = t % chunks;
        map_rows<scalar_t>(attn, a, b, a.N * c / chunks, a.N * (c + 1) / chunks, partials.data() + t * a.N,
                           rows.data() + b * a.N);
      }
    });
    for_each_image(a.B, [&](int64_t b) {
      finish_map(a, partials.data() + b * chunks * a.N, chunks, rows.data() + b * a.N, out + b * a.N);
    });
  });
}

}  // namespace

at::Tensor significance_cpu(const at::Tensor& attn, c10::string_view score, int64_t num_prefix) {
  const SigArgs a = check_significance(attn, score, num_prefix);
  at::Tensor sig = at::empty({a.B, a.N}, attn.options().dtype(at::kLong));
  significance_into(attn, a, sig);
  return sig;
}

at::Tensor select_cpu(const at::Tensor& sig, int64_t keep, c10::string_view strategy,
                      at::OptionalIntArrayRef grid) {
  const SelectArgs s = check_select(sig, keep, strategy, grid);
  at::Tensor idx = at::empty({s.B, s.keep}, sig.options());
  const at::Tensor sc = sig.contiguous();  // (B, N) int64: tiny next to the map
  const int64_t* in = sc.const_data_ptr<int64_t>();
  int64_t* out = idx.data_ptr<int64_t>();
  for_each_image(s.B, [&](int64_t b) {
    std::vector<int64_t> scratch, order;
    select_image(in + b * s.N, s, out + b * s.keep, scratch, order);
  });
  return idx;
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_cpu(const at::Tensor& tokens, const at::Tensor& attn,
                                                    int64_t keep, c10::string_view strategy,
                                                    c10::string_view score, int64_t num_prefix,
                                                    at::OptionalIntArrayRef grid) {
  const PruneArgs p = check_prune(tokens, attn, keep, strategy, score, num_prefix, grid);
  at::Tensor pruned = at::empty({p.sel.B, p.sel.keep, p.D}, tokens.options());
  at::Tensor idx = at::empty({p.sel.B, p.sel.keep}, tokens.options().dtype(at::kLong));
  if (p.sel.B == 0) return {pruned, idx};
  at::Tensor sig = at::empty({p.sel.B, p.sel.N}, idx.options());
  significance_into(attn, p.sig, sig);
  const int64_t* s = sig.const_data_ptr<int64_t>();
  int64_t* ix = idx.data_ptr<int64_t>();
  char* out = static_cast<char*>(pruned.data_ptr());
  const int64_t row_bytes = p.sel.keep * p.D * tokens.element_size();
  for_each_image(p.sel.B, [&](int64_t b) {
    std::vector<int64_t> scratch, order;
    select_image(s + b * p.sel.N, p.sel, ix + b * p.sel.keep, scratch, order);
    gather_image(tokens, b, ix + b * p.sel.keep, p.sel.keep, out + b * row_bytes);
  });
  return {pruned, idx};
}

}  // namespace fopru
