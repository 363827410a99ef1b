// Streaming GEMV for the few-token expert FFN (expert_gemv.h), written once with the native
// vector of the including file (lanes.h: zmm in expert_gemv_avx512.cpp, ymm in
// expert_gemv_avx2.cpp, SSE in expert_gemv.cpp). Internal linkage throughout.
//
// acc[t, 0:cw] = sum_i xs[t, i] * W[i, 0:cw] for t < NT: four weight rows at a time are streamed
// (each element loaded once, whatever NT is) and added into the NT partial-sum rows, which stay in
// L1/L2 (NT * cw floats; the driver passes whole rows, cw = h or d). Per 4 rows and vector: 4
// weight loads, NT loads and NT stores of partial sums; the weights come from memory, so the loop
// runs at memory bandwidth.
#pragma once

#include "expert_gemv.h"
#include "lanes.h"

namespace sf {
// gemv_cols_impl is the GemvColsFn of the including file's ISA (see expert_gemv.h).
namespace {

typedef float vflu_g __attribute__((vector_size(kVL * 4), aligned(4)));  // unaligned load / store

inline vfl ld_g(const float* p) { return *reinterpret_cast<const vflu_g*>(p); }
inline void st_g(float* p, vfl v) { *reinterpret_cast<vflu_g*>(p) = v; }

template <int NT>
void gemv_cols_nt(const float* W, int64_t ld, int64_t rows, int64_t cw, const float* xs, int64_t xs_ld, float* acc,
                  int64_t acc_ld) {
  const int64_t cv = cw - cw % kVL;  // columns done by vectors
  for (int t = 0; t < NT; ++t)
    for (int64_t j = 0; j < cw; ++j) acc[t * acc_ld + j] = 0.f;
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const float* w0 = W + i * ld;
    const float* w1 = w0 + ld;
    const float* w2 = w1 + ld;
    const float* w3 = w2 + ld;
    float x0[NT], x1[NT], x2[NT], x3[NT];
    for (int t = 0; t < NT; ++t) {
      x0[t] = xs[t * xs_ld + i];
      x1[t] = xs[t * xs_ld + i + 1];
      x2[t] = xs[t * xs_ld + i + 2];
      x3[t] = xs[t * xs_ld + i + 3];
    }
    for (int64_t j = 0; j < cv; j += kVL) {
      const vfl a = ld_g(w0 + j), b = ld_g(w1 + j), c = ld_g(w2 + j), e = ld_g(w3 + j);
      for (int t = 0; t < NT; ++t) {
        float* s = acc + t * acc_ld + j;
        vfl v = ld_g(s);
        v += x0[t] * a;
        v += x1[t] * b;
        v += x2[t] * c;
        v += x3[t] * e;
        st_g(s, v);
      }
    }
    for (int64_t j = cv; j < cw; ++j) {
      for (int t = 0; t < NT; ++t) {
        float v = acc[t * acc_ld + j];
        v += x0[t] * w0[j];
        v += x1[t] * w1[j];
        v += x2[t] * w2[j];
        v += x3[t] * w3[j];
        acc[t * acc_ld + j] = v;
      }
    }
  }
  for (; i < rows; ++i) {
    const float* w0 = W + i * ld;
    for (int t = 0; t < NT; ++t) {
      const float xv = xs[t * xs_ld + i];
      float* s = acc + t * acc_ld;
      int64_t j = 0;
      for (; j < cv; j += kVL) st_g(s + j, ld_g(s + j) + xv * ld_g(w0 + j));
      for (; j < cw; ++j) s[j] += xv * w0[j];
    }
  }
}

// y[t, e] = dot(x[t, :], W[e, :]): kVL lanes of partial sums per dot, added lane by lane at the end,
// then the tail columns (so the summation order depends on the vector width, not on T or N).
void row_dots_impl(const float* W, int64_t N, int64_t d, const float* x, int64_t T, float* y) {
  const int64_t dv = d - d % kVL;
  for (int64_t e = 0; e < N; ++e) {
    const float* w = W + e * d;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * d;
      vfl s0 = vfl{}, s1 = vfl{};  // two chains: the loop is bound by the add latency, not by loads
      int64_t j = 0;
      for (; j + 2 * kVL <= dv; j += 2 * kVL) {
        s0 += ld_g(w + j) * ld_g(xt + j);
        s1 += ld_g(w + j + kVL) * ld_g(xt + j + kVL);
      }
      for (; j < dv; j += kVL) s0 += ld_g(w + j) * ld_g(xt + j);
      s0 += s1;
      float r = 0.f;
      for (int l = 0; l < kVL; ++l) r += s0[l];
      for (; j < d; ++j) r += w[j] * xt[j];
      y[t * N + e] = r;
    }
  }
}

void gemv_cols_impl(const float* W, int64_t ld, int64_t rows, int64_t cw, const float* xs, int64_t xs_ld, int n,
                    float* acc, int64_t acc_ld) {
  switch (n) {
    case 1: gemv_cols_nt<1>(W, ld, rows, cw, xs, xs_ld, acc, acc_ld); break;
    case 2: gemv_cols_nt<2>(W, ld, rows, cw, xs, xs_ld, acc, acc_ld); break;
    case 3: gemv_cols_nt<3>(W, ld, rows, cw, xs, xs_ld, acc, acc_ld); break;
    default: gemv_cols_nt<4>(W, ld, rows, cw, xs, xs_ld, acc, acc_ld); break;
  }
}

}  // namespace
}  // namespace sf
