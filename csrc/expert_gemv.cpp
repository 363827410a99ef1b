// Few-token expert FFN: scalar reference (test oracle), portable kernel, run-time dispatch and the
// driver that groups slots by expert and spreads the GEMVs over the thread pool.
#include "expert_gemv.h"

#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "expert_gemv_kernels.h"
#include "threadpool.h"

namespace sf {

namespace scalar {
extern const GemvColsFn gemv_cols = gemv_cols_impl;
extern const RowDotsFn row_dots = row_dots_impl;
}  // namespace scalar

namespace {

constexpr int kMaxGroup = 4;                    // slots per GEMV call (one weight read serves them all)
constexpr double kParallelMinFloats = 1 << 16;  // weights streamed below which one thread does it all

float act_fn(Act a, float v) {
  switch (a) {
    case Act::silu: return v / (1.f + std::exp(-v));
    case Act::gelu: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752440f));
    case Act::gelu_tanh: {
      const float inner = 0.79788456080286535588f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + std::tanh(inner));
    }
    case Act::relu: return v > 0.f ? v : (v == v ? 0.f : v);  // NaN stays NaN
  }
  return v;
}

void check(const ExpertFfnProblem& p) {
  if (p.T < 0 || p.d < 1 || p.h < 1 || p.E < 1 || p.k < 0) {
    throw std::invalid_argument("expert FFN needs d, h, E >= 1 and T, k >= 0; got T=" + std::to_string(p.T) +
                                " d=" + std::to_string(p.d) + " h=" + std::to_string(p.h) + " E=" + std::to_string(p.E) +
                                " k=" + std::to_string(p.k));
  }
  for (int64_t s = 0; s < p.T * p.k; ++s) {
    if (p.experts[s] < -1 || p.experts[s] >= p.E) {
      throw std::invalid_argument("expert id " + std::to_string(p.experts[s]) + " at slot " + std::to_string(s) +
                                  " is outside [-1, " + std::to_string(p.E) + ")");
    }
  }
}

// One ISA's kernels of this file.
struct Kernels {
  GemvColsFn gemv_cols;
  RowDotsFn row_dots;
};

Kernels kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return {avx512::gemv_cols, avx512::row_dots};
  if (isa == Isa::avx2) return {avx2::gemv_cols, avx2::row_dots};
#endif
  (void)isa;
  return {scalar::gemv_cols, scalar::row_dots};
}

void check_linear(int64_t T, int64_t d, int64_t N) {
  if (T < 0 || d < 0 || N < 0) {
    throw std::invalid_argument("few-token linear: negative size (T=" + std::to_string(T) + ", d=" + std::to_string(d) +
                                ", N=" + std::to_string(N) + ")");
  }
}

std::unique_ptr<float[]> floats(int64_t n) { return std::unique_ptr<float[]>(new float[n > 0 ? n : 1]); }

}  // namespace

void expert_ffn_ref(const ExpertFfnProblem& p) {
  check(p);
  std::vector<float> g(static_cast<size_t>(p.h)), u(static_cast<size_t>(p.h)), o(static_cast<size_t>(p.d));
  for (int64_t t = 0; t < p.T; ++t) {
    float* yt = p.y + t * p.d;
    for (int64_t j = 0; j < p.d; ++j) yt[j] = 0.f;
    const float* xt = p.x + t * p.d;
    for (int64_t s = 0; s < p.k; ++s) {
      const int64_t e = p.experts[t * p.k + s];
      if (e < 0) continue;
      const float* wu = p.w_up + e * p.d * p.h;
      for (int64_t c = 0; c < p.h; ++c) {
        float a = 0.f, b = 0.f;
        for (int64_t i = 0; i < p.d; ++i) {
          b += xt[i] * wu[i * p.h + c];
          if (p.w_gate) a += xt[i] * p.w_gate[e * p.d * p.h + i * p.h + c];
        }
        u[c] = p.w_gate ? act_fn(p.act, a) * b : act_fn(p.act, b);
      }
      const float* wd = p.w_down + e * p.h * p.d;
      for (int64_t j = 0; j < p.d; ++j) {
        float a = 0.f;
        for (int64_t c = 0; c < p.h; ++c) a += u[c] * wd[c * p.d + j];
        o[j] = a;
      }
      const float w = p.weights[t * p.k + s];
      for (int64_t j = 0; j < p.d; ++j) yt[j] += w * o[j];
    }
  }
}

void expert_ffn(const ExpertFfnProblem& p, Isa isa, int64_t block_floats, bool parallel, AfterJob after) {
  check(p);
  const GemvColsFn gemv = kernels(isa).gemv_cols;
  const int64_t d = p.d, h = p.h, S = p.T * p.k;
  // Slots grouped by expert (ascending), each group in slot order.
  std::vector<int64_t> count(static_cast<size_t>(p.E), 0);
  for (int64_t s = 0; s < S; ++s)
    if (p.experts[s] >= 0) ++count[static_cast<size_t>(p.experts[s])];
  std::vector<int64_t> start(static_cast<size_t>(p.E) + 1, 0);
  for (int64_t e = 0; e < p.E; ++e) start[e + 1] = start[e] + count[e];
  const int64_t n = start[p.E];  // non-empty slots
  std::vector<int64_t> order(static_cast<size_t>(n)), pos(static_cast<size_t>(S), -1);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t e = p.experts[s];
      if (e < 0) continue;
      pos[s] = fill[e];
      order[fill[e]++] = s;
    }
  }
  if (n == 0) {
    for (int64_t t = 0; t < p.T * d; ++t) p.y[t] = 0.f;
    return;
  }
  // Groups: (expert, first sorted slot, slots <= kMaxGroup); each reads its expert's weights once.
  struct Group { int64_t e, s0, ns; };
  std::vector<Group> groups;
  int64_t experts_used = 0;
  for (int64_t e = 0; e < p.E; ++e) {
    experts_used += count[e] > 0;
    for (int64_t s0 = start[e]; s0 < start[e + 1]; s0 += kMaxGroup)
      groups.push_back({e, s0, min64(kMaxGroup, start[e + 1] - s0)});
  }
  const int64_t ng = static_cast<int64_t>(groups.size());
  const bool par = parallel && static_cast<double>(experts_used) * d * h * (p.w_gate ? 3 : 2) >= kParallelMinFloats;
  // Each weight matrix is streamed in contiguous row blocks (whole rows: one sequential sweep per
  // task, which the hardware prefetchers follow best); the row blocks' partial sums are added in
  // block order afterwards, so the result does not depend on which thread ran what.
  const int64_t target = block_floats > 0 ? block_floats : (int64_t{1} << 20);  // ~4 MB of weights per task
  const int64_t nb1 = min64(d, max64(1, (d * h + target - 1) / target)), rb1 = (d + nb1 - 1) / nb1;
  const int64_t nb2 = min64(h, max64(1, (h * d + target - 1) / target)), rb2 = (h + nb2 - 1) / nb2;
  const int64_t nmat = p.w_gate ? 2 : 1;

  auto xs = floats(n * d);              // (n, d) tokens in sorted slot order
  auto p1 = floats(nmat * nb1 * n * h); // (mat, block, n, h) partial up / gate pre-activations
  auto hid = floats(n * h);             // (n, h) act(g) * u
  auto p2 = floats(nb2 * n * d);        // (block, n, d) partial unweighted expert outputs
  for (int64_t q = 0; q < n; ++q) {
    const int64_t t = order[q] / p.k;
    for (int64_t i = 0; i < d; ++i) xs[q * d + i] = p.x[t * d + i];
  }
  for (int64_t t = 0; t < p.T * d; ++t) p.y[t] = 0.f;  // after x is copied: y may alias x

  // Phase 1: partial xs @ w_up[e] (and xs @ w_gate[e]) per (matrix, group, row block)
  parallel_for(
      nmat * ng * nb1,
      [&](int64_t task, int) {
        const int64_t b = task % nb1, gi = (task / nb1) % ng, m = task / (nb1 * ng);
        const Group& g = groups[static_cast<size_t>(gi)];
        const int64_t i0 = b * rb1, rows = min64(rb1, d - i0);
        if (rows <= 0) return;
        const float* W = (m == 0 ? p.w_up : p.w_gate) + g.e * d * h + i0 * h;
        gemv(W, h, rows, h, xs.get() + g.s0 * d + i0, d, static_cast<int>(g.ns), p1.get() + ((m * nb1 + b) * n + g.s0) * h, h);
      },
      par);
  // Phase 2: partial hid @ w_down[e] per (group, row block of h); the task first sums phase 1's
  // row blocks for its own hidden units and applies the activation (no third pool job).
  parallel_for(
      ng * nb2,
      [&](int64_t task, int) {
        const int64_t b = task % nb2;
        const Group& g = groups[static_cast<size_t>(task / nb2)];
        const int64_t i0 = b * rb2, rows = min64(rb2, h - i0);
        if (rows <= 0) return;
        for (int64_t q = g.s0; q < g.s0 + g.ns; ++q) {
          for (int64_t j = i0; j < i0 + rows; ++j) {
            float u = 0.f, a = 0.f;
            for (int64_t c = 0; c < nb1 && c * rb1 < d; ++c) {
              u += p1[(c * n + q) * h + j];
              if (nmat == 2) a += p1[((nb1 + c) * n + q) * h + j];
            }
            hid[q * h + j] = nmat == 2 ? act_fn(p.act, a) * u : act_fn(p.act, u);
          }
        }
        gemv(p.w_down + g.e * h * d + i0 * d, d, rows, d, hid.get() + g.s0 * h + i0, h, static_cast<int>(g.ns),
             p2.get() + (b * n + g.s0) * d, d);
      },
      par, after);
  // y[t] = sum of weight * (sum of row blocks) over t's slots, in slot order
  for (int64_t s = 0; s < S; ++s) {
    if (pos[s] < 0) continue;
    const float w = p.weights[s];
    float* yt = p.y + (s / p.k) * d;
    for (int64_t j = 0; j < d; ++j) {
      float o = 0.f;
      for (int64_t b = 0; b < nb2 && b * rb2 < h; ++b) o += p2[(b * n + pos[s]) * d + j];
      yt[j] += w * o;
    }
  }
}

void expert_decode_step(ExpertFfnProblem p, const DecodeRouting& r, Isa isa, int64_t block_floats, bool parallel,
                        AfterJob after) {
  if (p.T < 0 || p.d < 1 || p.E < 1 || p.k < 1 || p.k > p.E) {
    throw std::invalid_argument("decode step needs d, E >= 1 and 1 <= k <= E; got d=" + std::to_string(p.d) +
                                " E=" + std::to_string(p.E) + " k=" + std::to_string(p.k));
  }
  kernels(isa).row_dots(r.router, p.E, p.d, p.x, p.T, r.logits);
  for (int64_t e = 0; e < p.E; ++e) r.counts[e] = 0;
  for (int64_t t = 0; t < p.T; ++t) {
    const float* z = r.logits + t * p.E;
    float* pr = r.probs + t * p.E;
    float m = -INFINITY;
    bool nan = false;
    for (int64_t e = 0; e < p.E; ++e) {
      nan = nan || z[e] != z[e];
      m = z[e] > m ? z[e] : m;
    }
    float sum = 0.f;
    for (int64_t e = 0; e < p.E; ++e) sum += (pr[e] = nan ? NAN : std::exp(z[e] - m));
    for (int64_t e = 0; e < p.E; ++e) pr[e] /= sum;
    int64_t* ex = r.experts + t * p.k;
    float* w = r.weights + t * p.k;
    float chosen = 0.f;
    for (int64_t j = 0; j < p.k; ++j) {  // selection: the best not yet taken, ties to the lower index
      int64_t best = -1;
      for (int64_t e = 0; e < p.E; ++e) {
        bool taken = false;
        for (int64_t i = 0; i < j; ++i) taken = taken || ex[i] == e;
        if (taken) continue;
        const bool better = best < 0 || (pr[e] != pr[e] && pr[best] == pr[best]) || pr[e] > pr[best];
        if (better) best = e;
      }
      ex[j] = best;
      w[j] = pr[best];
      chosen += pr[best];
      ++r.counts[best];
    }
    if (r.renormalize)
      for (int64_t j = 0; j < p.k; ++j) w[j] /= chosen;
  }
  p.experts = r.experts;
  p.weights = r.weights;
  expert_ffn(p, isa, block_floats, parallel, after);
}

void few_token_linear(const float* x, int64_t T, int64_t d, const float* W, int64_t N, float* y, Isa isa) {
  check_linear(T, d, N);
  kernels(isa).row_dots(W, N, d, x, T, y);
}

void few_token_linear_ref(const float* x, int64_t T, int64_t d, const float* W, int64_t N, float* y) {
  check_linear(T, d, N);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < N; ++e) {
      float a = 0.f;
      for (int64_t i = 0; i < d; ++i) a += x[t * d + i] * W[e * d + i];
      y[t * N + e] = a;
    }
  }
}

}  // namespace sf
