// Label scores and token selection (label_select.h): scalar reference, portable kernel, run-time
// dispatch and the selection driver.
#include "label_select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
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

LabelKeyFn key_kernel(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return avx512::label_keys_row;
  if (isa == Isa::avx2) return avx2::label_keys_row;
#endif
  (void)isa;
  return scalar::label_keys_row;
}

void check_budget(const LabelProblem& p, int64_t budget) {
  if (budget < 1 || budget > p.n) {
    throw std::invalid_argument("the budget must be in [1, n]; got budget=" + std::to_string(budget) +
                                " n=" + std::to_string(p.n));
  }
}

// the selection of one (b, h) (label_select.h); per-thread buffers, reused across calls
void select_row(const LabelProblem& p, int64_t bh, int64_t budget, LabelKeyFn fn, int32_t* out) {
  thread_local std::vector<uint32_t> key;
  thread_local std::vector<int32_t> hist, cand;
  thread_local std::vector<uint32_t> bin;
  const int64_t n = p.n, capb = p.cap / 2;
  key.resize(static_cast<size_t>(n));
  hist.assign(65536, 0);
  fn(p.q + bh * p.C, p.codes + bh * p.C * capb, p.scales + bh * p.cap, p.C, capb, n, p.scores + bh * n, key.data(),
     hist.data());
  int64_t need = budget;  // how many keys of the threshold's bin must still be taken
  int hi = 65535;
  for (; hi > 0 && hist[hi] < need; --hi) need -= hist[hi];
  // every token whose key's high digit is hi or more, in token order (branch free)
  const uint32_t floor = static_cast<uint32_t>(hi) << 16;
  const int64_t listed = budget - need + hist[hi];
  cand.resize(static_cast<size_t>(listed + 1));
  const uint32_t* k = key.data();
  int32_t* c = cand.data();
  int64_t m = 0;
  for (int64_t t = 0; t < n; ++t) {
    c[m] = static_cast<int32_t>(t);
    m += k[t] >= floor;
  }
  // the threshold: the need-th largest key of the bin; take every larger key and the `need` oldest equal ones
  bin.clear();
  for (int64_t i = 0; i < listed; ++i)
    if (k[c[i]] >> 16 == static_cast<uint32_t>(hi)) bin.push_back(k[c[i]]);
  std::nth_element(bin.begin(), bin.begin() + (need - 1), bin.end(), std::greater<uint32_t>());
  const uint32_t thr = bin[static_cast<size_t>(need - 1)];
  for (const uint32_t x : bin) need -= x > thr;  // now: how many keys equal to thr to take
  int64_t taken = 0;
  for (int64_t i = 0; i < listed; ++i) {
    const uint32_t x = k[c[i]];
    if (x > thr || (x == thr && need-- > 0)) out[taken++] = c[i];
  }
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
  check_budget(p, budget);
  const LabelKeyFn fn = key_kernel(isa);
  parallel_for(
      p.B * p.Hkv, [&](int64_t bh, int) { select_row(p, bh, budget, fn, chosen + bh * budget); },
      parallel && p.B * p.Hkv > 1 && p.n * p.C >= 4096);
}

void label_select_ref(const float* scores, int64_t rows, int64_t n, int64_t budget, int32_t* chosen) {
  if (rows < 0 || budget < 1 || budget > n) {
    throw std::invalid_argument("the budget must be in [1, n]; got budget=" + std::to_string(budget) +
                                " n=" + std::to_string(n));
  }
  std::vector<int32_t> order(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = scores + r * n;
    for (int64_t t = 0; t < n; ++t) order[t] = static_cast<int32_t>(t);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return label_rank_key(s[a]) > label_rank_key(s[b]); });
    std::sort(order.begin(), order.begin() + budget);
    std::copy(order.begin(), order.begin() + budget, chosen + r * budget);
  }
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
