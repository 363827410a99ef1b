// rms_norm and swiglu of decode_glue.h, written once with the native vector of the including file
// (lanes.h: zmm in decode_glue_avx512.cpp, ymm in decode_glue_avx2.cpp, SSE in decode_glue.cpp).
// Internal linkage throughout; `namespace <isa> { SF_DEFINE_GLUE_KERNELS }` defines the file's table.
#pragma once

#include <cmath>

#include "decode_glue.h"
#include "lanes.h"
#include "vec_exp.h"

namespace sf {
namespace {

typedef float vglue_u __attribute__((vector_size(kVL * 4), aligned(4)));  // unaligned float load / store

inline vfl gload(const float* p) { return *reinterpret_cast<const vglue_u*>(p); }
inline void gstore(float* p, vfl v) { *reinterpret_cast<vglue_u*>(p) = v; }

void glue_rms_norm(float* h, const float* residual, const float* weight, int64_t rows, int64_t n, float eps, float* out) {
  const int64_t nv = n - n % kVL;
  for (int64_t r = 0; r < rows; ++r) {
    float* hr = h + r * n;
    float* o = out + r * n;
    vfl s0 = vfl{}, s1 = vfl{};  // two chains of partial sums of squares
    int64_t i = 0;
    if (residual) {
      const float* res = residual + r * n;
      for (; i < nv; i += kVL) {
        const vfl v = gload(hr + i) + gload(res + i);
        gstore(hr + i, v);
        s0 += v * v;
      }
      for (int64_t j = nv; j < n; ++j) hr[j] += res[j];
    } else {
      for (; i + 2 * kVL <= nv; i += 2 * kVL) {
        const vfl a = gload(hr + i), b = gload(hr + i + kVL);
        s0 += a * a;
        s1 += b * b;
      }
      for (; i < nv; i += kVL) {
        const vfl a = gload(hr + i);
        s0 += a * a;
      }
    }
    s0 += s1;
    double ss = 0.0;
    for (int l = 0; l < kVL; ++l) ss += s0[l];
    for (int64_t j = nv; j < n; ++j) ss += static_cast<double>(hr[j]) * hr[j];
    const float mean = static_cast<float>(ss) / static_cast<float>(n);
    const float inv = 1.f / std::sqrt(mean + eps);
    const vfl iv = vfl{} + inv;
    for (i = 0; i < nv; i += kVL) gstore(o + i, gload(weight + i) * (gload(hr + i) * iv));
    for (int64_t j = nv; j < n; ++j) o[j] = weight[j] * (hr[j] * inv);
  }
}

// silu(g) * u for one vector: e = e^-|g| in (0, 1], g >= 0: g / (1 + e); g < 0: g e / (1 + e)
inline vfl silu_times(vfl g, vfl u) {
  const vfl ag = g < 0 ? -g : g;
  const vfl e = exp_neg(-ag);
  const vfl num = g < 0 ? g * e : g;
  return num / (e + 1.f) * u;
}

void glue_swiglu(const float* gate_up, int64_t rows, int64_t f, float* out) {
  const int64_t nv = f - f % kVL;
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * f;
    const float* u = g + f;
    float* o = out + r * f;
    for (int64_t i = 0; i < nv; i += kVL) gstore(o + i, silu_times(gload(g + i), gload(u + i)));
    if (nv < f) {  // the tail through one zero-padded vector
      vfl gt = vfl{}, ut = vfl{};
      for (int64_t j = nv; j < f; ++j) {
        gt[j - nv] = g[j];
        ut[j - nv] = u[j];
      }
      const vfl ot = silu_times(gt, ut);
      for (int64_t j = nv; j < f; ++j) o[j] = ot[j - nv];
    }
  }
}

}  // namespace
}  // namespace sf

#define SF_DEFINE_GLUE_KERNELS extern const GlueKernels glue_kernels = {glue_rms_norm, glue_swiglu};
