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

// ---- bfloat16 (raw uint16 bits): widened exactly, each result rounded to nearest even as torch rounds ----

typedef uint16_t vglue_u16 __attribute__((vector_size(kVL * 2), aligned(2)));
typedef uint32_t vglue_u32 __attribute__((vector_size(kVL * 4)));

inline vfl bload(const uint16_t* p) {
  const vglue_u32 w = __builtin_convertvector(*reinterpret_cast<const vglue_u16*>(p), vglue_u32) << 16;
  return reinterpret_cast<vfl>(w);
}

// round to nearest even (bf16_round of decode_glue.h), NaN as the quiet 0x7fc0
inline vfl bround(vfl v) {
  const vglue_u32 b = reinterpret_cast<vglue_u32>(v);
  vglue_u32 r = ((b + 0x7fffu + ((b >> 16) & 1u)) >> 16) << 16;
  r = v != v ? vglue_u32{} + (0x7fc0u << 16) : r;
  return reinterpret_cast<vfl>(r);
}

inline void bstore(uint16_t* p, vfl v) {  // v already rounded: its high halves
  *reinterpret_cast<vglue_u16*>(p) = __builtin_convertvector(reinterpret_cast<vglue_u32>(v) >> 16, vglue_u16);
}

void glue_rms_norm_bf16(uint16_t* h, const uint16_t* residual, const uint16_t* weight, int64_t rows, int64_t n, float eps,
                        uint16_t* out) {
  const int64_t nv = n - n % kVL;
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* hr = h + r * n;
    uint16_t* o = out + r * n;
    if (residual) {
      const uint16_t* res = residual + r * n;
      for (int64_t i = 0; i < nv; i += kVL) bstore(hr + i, bround(bload(hr + i) + bload(res + i)));
      for (int64_t j = nv; j < n; ++j) hr[j] = bf16_round(bf16_float(hr[j]) + bf16_float(res[j]));
    }
    vfl s0 = vfl{};
    for (int64_t i = 0; i < nv; i += kVL) {
      const vfl v = bload(hr + i);
      s0 += v * v;
    }
    double ss = 0.0;
    for (int l = 0; l < kVL; ++l) ss += s0[l];
    for (int64_t j = nv; j < n; ++j) ss += static_cast<double>(bf16_float(hr[j])) * bf16_float(hr[j]);
    const float inv = 1.f / std::sqrt(static_cast<float>(ss) / static_cast<float>(n) + eps);
    const vfl iv = vfl{} + inv;
    for (int64_t i = 0; i < nv; i += kVL) bstore(o + i, bround(bload(weight + i) * bround(bload(hr + i) * iv)));
    for (int64_t j = nv; j < n; ++j) o[j] = bf16_round(bf16_float(weight[j]) * bf16_float(bf16_round(bf16_float(hr[j]) * inv)));
  }
}

void glue_swiglu_bf16(const uint16_t* gate_up, int64_t rows, int64_t f, uint16_t* out) {
  const int64_t nv = f - f % kVL;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* g = gate_up + r * 2 * f;
    const uint16_t* u = g + f;
    uint16_t* o = out + r * f;
    for (int64_t i = 0; i < nv; i += kVL) bstore(o + i, bround(bround(silu_times(bload(g + i), vfl{} + 1.f)) * bload(u + i)));
    if (nv < f) {
      vfl gt = vfl{}, ut = vfl{};
      for (int64_t j = nv; j < f; ++j) {
        gt[j - nv] = bf16_float(g[j]);
        ut[j - nv] = bf16_float(u[j]);
      }
      const vfl ot = bround(bround(silu_times(gt, vfl{} + 1.f)) * ut);
      for (int64_t j = nv; j < f; ++j) o[j] = bf16_round(ot[j - nv]);  // exact: ot is rounded
    }
  }
}

}  // namespace
}  // namespace sf

#define SF_DEFINE_GLUE_KERNELS                                                                  \
  extern const GlueKernels glue_kernels = {glue_rms_norm, glue_swiglu, glue_rms_norm_bf16, glue_swiglu_bf16};
