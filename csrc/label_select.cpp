// Label scores and token selection (label_select.h): scalar reference, portable kernel, run-time
// dispatch and the selection driver.
#include "label_select.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "label_select_kernels.h"
#include "threadpool.h"

namespace sf {

namespace scalar {
SF_DEFINE_LABEL_SELECT_KERNELS
}  // namespace scalar

namespace {

void check(const LabelProblem& p) {
  if (p.B < 1 || p.Hkv < 1 || p.C < 1 || p.n < 0 || p.cap < p.n || p.cap % 32) {
    throw std::invalid_argument("label scores need B, Hkv, C >= 1, 0 <= n <= cap and cap a multiple of 32; got B=" +
                                std::to_string(p.B) + " Hkv=" + std::to_string(p.Hkv) + " C=" + std::to_string(p.C) +
                                " n=" + std::to_string(p.n) + " cap=" + std::to_string(p.cap));
  }
}

LabelScoreFn kernel(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return avx512::label_scores_row;
  if (isa == Isa::avx2) return avx2::label_scores_row;
#endif
  (void)isa;
  return scalar::label_scores_row;
}

void scores_of(const LabelProblem& p, int64_t bh, LabelScoreFn fn) {
  const int64_t capb = p.cap / 2;
  fn(p.q + bh * p.C, p.codes + bh * p.C * capb, p.scales + bh * p.cap, p.C, capb, p.n, p.scores + bh * p.n);
}

}  // namespace

void label_scores_ref(const LabelProblem& p) {
  check(p);
  const int64_t capb = p.cap / 2;
  for (int64_t bh = 0; bh < p.B * p.Hkv; ++bh) {
    for (int64_t t = 0; t < p.n; ++t) {
      const int64_t byte = t / 32 * 16 + t % 16, shift = (t % 32) / 16 * 4;
      double a = 0.0;
      for (int64_t c = 0; c < p.C; ++c) {
        const int code = (p.codes[(bh * p.C + c) * capb + byte] >> shift) & 15;
        a += static_cast<double>(p.q[bh * p.C + c]) * (code - 8);
      }
      p.scores[bh * p.n + t] = static_cast<float>(a * p.scales[bh * p.cap + t]);
    }
  }
}

void label_scores(const LabelProblem& p, Isa isa, bool parallel) {
  check(p);
  const LabelScoreFn fn = kernel(isa);
  parallel_for(p.B * p.Hkv, [&](int64_t bh, int) { scores_of(p, bh, fn); }, parallel && p.n * p.C >= 4096);
}

void label_select(const LabelProblem& p, int64_t budget, int32_t* chosen, Isa isa, bool parallel) {
  check(p);
  if (budget < 1 || budget > p.n) {
    throw std::invalid_argument("the budget must be in [1, n]; got budget=" + std::to_string(budget) +
                                " n=" + std::to_string(p.n));
  }
  const LabelScoreFn fn = kernel(isa);
  parallel_for(
      p.B * p.Hkv,
      [&](int64_t bh, int) {
        scores_of(p, bh, fn);
        const float* s = p.scores + bh * p.n;
        std::vector<int32_t> idx(static_cast<size_t>(p.n));
        std::iota(idx.begin(), idx.end(), 0);
        // higher score first, NaN above every number, the older token first among equals
        auto before = [s](int32_t a, int32_t b) {
          const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
          if (na != nb) return na;
          if (!na && s[a] != s[b]) return s[a] > s[b];
          return a < b;
        };
        std::nth_element(idx.begin(), idx.begin() + (budget - 1), idx.end(), before);
        std::sort(idx.begin(), idx.begin() + budget);
        std::copy(idx.begin(), idx.begin() + budget, chosen + bh * budget);
      },
      parallel && p.B * p.Hkv > 1 && p.n * p.C >= 4096);
}

}  // namespace sf
