// One head of one attention map scored from q and k (SPEC.md "Significance from q and k"): the
// per-(image, head) work of the dense q/k CPU kernel (significance_qk.cpp) and of the packed one
// (significance_qk_varlen.cpp, where an attention segment is an image with no prefix token).
// Defined in qk_head.cpp for float, Half and BFloat16 inputs; the S x S map is never materialised.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace fopru::cpu {

// One head's q or k over the map's tokens: element (s, e) at p[s * ss + e * sd].
template <typename T>
struct Slice {
  const T* p;
  int64_t ss, sd;
  float at(int64_t s, int64_t e) const { return static_cast<float>(p[s * ss + e * sd]); }
};

// One head of one attention map: S tokens (queries = keys), the first P of them prefix tokens
// (CLS, registers), N = S - P patch tokens scored.
struct HeadMap {
  int64_t S, P, d;
  float scale;
  bool prob;         // softmax probabilities, else the scaled logits
  bool cls;          // the CLS row's values (query 0), else the patch block's column / row means
  const float* lse;  // prob: the given logsumexp of query s at lse[s * lse_ss]; nullptr: computed
  int64_t lse_ss;
};

// Buffers reused across the heads one task scores, so a task allocates them once.
struct HeadScratch {
  std::vector<float> kt, qt, qrows, u, logits, p;
  std::vector<double> col;
};

// fx of one head's values: col_fx[0..N) the CLS-row values (cls) or the column means over the N
// patch queries; row_fx[0..N) the row means over the N patch keys, or nullptr when not wanted
// (received, cls). Every float sum runs in an order fixed by (S, P, d, the clone the CPU picks),
// so the same head gives the same bits wherever it sits in a batch and on any thread.
template <typename T>
void head_values(const Slice<T>& q, const Slice<T>& k, const HeadMap& m, HeadScratch& w, int64_t* col_fx,
                 int64_t* row_fx);

extern template void head_values<float>(const Slice<float>&, const Slice<float>&, const HeadMap&, HeadScratch&,
                                        int64_t*, int64_t*);
extern template void head_values<c10::Half>(const Slice<c10::Half>&, const Slice<c10::Half>&, const HeadMap&,
                                            HeadScratch&, int64_t*, int64_t*);
extern template void head_values<c10::BFloat16>(const Slice<c10::BFloat16>&, const Slice<c10::BFloat16>&,
                                                const HeadMap&, HeadScratch&, int64_t*, int64_t*);

}  // namespace fopru::cpu
