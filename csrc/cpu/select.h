// Selection and gather shared by the CPU kernels (prune_tokens.cpp, prune_tokens_varlen.cpp,
// significance_qk.cpp): SPEC.md's focal choice and "Selection" on one image's int64 significance,
// and the bit-exact row copy.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../ops.h"

namespace fopru::cpu {

// SPEC.md's focal rule for one image, exactly (fopru.h): true when the column sums col[0..n) have
// the larger variance, false (ties too) for the row sums row[0..n).
inline bool focal_prefers_col(const int64_t* col, const int64_t* row, int64_t n) {
  FocalSums c{}, r{};
  for (int64_t j = 0; j < n; ++j) {
    c.add(col[j]);
    r.add(row[j]);
  }
  return focal_use_col(c, r, n);
}

// The `count` largest of score[0..n) (ties to the lower index), written to out in index order.
// nth_element finds the count-th (score, index) pair; everything ranking before it is kept.
inline void top_in_order(const int64_t* score, int64_t n, int64_t count, int64_t* out,
                         std::vector<int64_t>& order) {
  if (count == 0) return;
  order.resize(n);
  for (int64_t j = 0; j < n; ++j) order[j] = j;
  auto before = [score](int64_t x, int64_t y) {
    return score[x] > score[y] || (score[x] == score[y] && x < y);
  };
  std::nth_element(order.begin(), order.begin() + (count - 1), order.end(), before);
  const int64_t last = order[count - 1];
  int64_t k = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (j == last || before(j, last)) out[k++] = j;
  }
}

// idx[0..s.keep) = the kept token indices of one image (sig: its s.N contiguous values),
// ascending. scratch and order are reused buffers, so a task allocates them once.
inline void select_image(const int64_t* sig, const SelectArgs& s, int64_t* idx, std::vector<int64_t>& scratch,
                         std::vector<int64_t>& order) {
  if (s.strategy == Strategy::kRank) {
    top_in_order(sig, s.N, s.keep, idx, order);
    return;
  }
  scratch.assign(s.rows, 0);
  for (int64_t y = 0; y < s.rows; ++y) {
    int64_t acc = 0;
    for (int64_t x = 0; x < s.cols; ++x) acc += sig[y * s.cols + x];
    scratch[y] = acc;
  }
  const int64_t r = s.keep / s.cols;
  std::vector<int64_t> kept(r);
  top_in_order(scratch.data(), s.rows, r, kept.data(), order);
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t x = 0; x < s.cols; ++x) idx[i * s.cols + x] = kept[i] * s.cols + x;
  }
}

// out[k, :] = row idx[k] of a (rows, d) matrix at base with byte strides (row_bytes, elem_stride),
// as raw bytes: bit-exact for every dtype. out is contiguous, d * es bytes a row.
inline void gather_rows(const char* base, int64_t row_bytes, int64_t elem_stride, int64_t es, int64_t d,
                        const int64_t* idx, int64_t count, char* out) {
  for (int64_t k = 0; k < count; ++k) {
    const char* src = base + idx[k] * row_bytes;
    char* dst = out + k * d * es;
    if (elem_stride == es) {
      std::memcpy(dst, src, d * es);
    } else {
      for (int64_t x = 0; x < d; ++x) std::memcpy(dst + x * es, src + x * elem_stride, es);
    }
  }
}

// f(b) for every image b < batch, images spread over the intra-op threads.
template <typename F>
void for_each_image(int64_t batch, const F& f) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) f(b);
  });
}

}  // namespace fopru::cpu
