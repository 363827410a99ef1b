// Label scores and token selection (label_select.h): scalar reference, portable kernel, run-time
// dispatch and the selection driver.
#include "label_select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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

// an unsigned key in the order of the float (larger float, larger key); NaN above +inf
inline uint32_t rank_key(float f) {
  if (std::isnan(f)) return 0xffffffffu;
  if (f == 0.f) f = 0.f;  // -0 ties with +0
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
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
        // rank keys: unsigned integers in the order of the scores (NaN above +inf); the budget-th
        // largest key found by a radix select in two 16-bit digits (the high digit holds the sign,
        // the exponent and 7 mantissa bits, so scores of one magnitude still spread over many bins)
        std::vector<uint32_t> key(static_cast<size_t>(p.n));
        std::vector<int32_t> hist(65536, 0);
        for (int64_t t = 0; t < p.n; ++t) {
          key[t] = rank_key(s[t]);
          ++hist[key[t] >> 16];
        }
        int64_t need = budget;  // how many of the keys matching the digits found must still be taken
        int hi = 65535;
        for (; hi > 0 && hist[hi] < need; --hi) need -= hist[hi];
        std::fill(hist.begin(), hist.end(), 0);
        for (int64_t t = 0; t < p.n; ++t)
          if (static_cast<int>(key[t] >> 16) == hi) ++hist[key[t] & 0xffffu];
        int lo = 65535;
        for (; lo > 0 && hist[lo] < need; --lo) need -= hist[lo];
        const uint32_t prefix = static_cast<uint32_t>(hi) << 16 | static_cast<uint32_t>(lo);
        // prefix is the threshold key: take every larger key and the `need` oldest equal ones, in token order
        int32_t* out = chosen + bh * budget;
        int64_t k = 0;
        for (int64_t t = 0; t < p.n; ++t) {
          if (key[t] > prefix || (key[t] == prefix && need > 0)) {
            if (key[t] == prefix) --need;
            out[k++] = static_cast<int32_t>(t);
          }
        }
      },
      parallel && p.B * p.Hkv > 1 && p.n * p.C >= 4096);
}

void gather_tokens(const void* src, int64_t elt, int64_t B, int64_t Hkv, int64_t cap, int64_t D, const int32_t* idx,
                   int64_t k, void* dst, bool parallel) {
  const size_t row = static_cast<size_t>(D * elt);
  for (int64_t i = 0; i < B * Hkv * k; ++i) {
    if (idx[i] < 0 || idx[i] >= cap) {
      throw std::invalid_argument("token index " + std::to_string(idx[i]) + " outside the cache capacity " + std::to_string(cap));
    }
  }
  parallel_for(
      B * Hkv,
      [&](int64_t bh, int) {
        const char* from = static_cast<const char*>(src) + static_cast<size_t>(bh * cap) * row;
        char* to = static_cast<char*>(dst) + static_cast<size_t>(bh * k) * row;
        const int32_t* ix = idx + bh * k;
        constexpr int64_t kAhead = 16;  // rows prefetched ahead: the reads are scattered over the cache
        for (int64_t i = 0; i < k; ++i) {
          if (i + kAhead < k) {
            const char* next = from + static_cast<size_t>(ix[i + kAhead]) * row;
            for (size_t o = 0; o < row; o += 64) __builtin_prefetch(next + o, 0, 0);
          }
          std::memcpy(to + i * row, from + static_cast<size_t>(ix[i]) * row, row);
        }
      },
      parallel && B * Hkv > 1 && k * D >= 4096);
}

}  // namespace sf
