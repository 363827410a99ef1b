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

// silu(g) for one vector: e = e^-|g| in (0, 1], g >= 0: g / (1 + e); g < 0: g e / (1 + e)
inline vfl silu(vfl g) {
  const vfl ag = g < 0 ? -g : g;
  const vfl e = exp_neg(-ag);
  const vfl num = g < 0 ? g * e : g;
  return num / (e + 1.f);
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

// Element access of one buffer type: load widens to float32 (exact), round rounds to the type (float32: nothing),
// store writes a rounded vector; the scalar twins for the tails.
struct F32Io {
  using T = float;
  static vfl load(const float* p) { return gload(p); }
  static vfl round(vfl v) { return v; }
  static void store(float* p, vfl v) { gstore(p, v); }
  static float widen(float v) { return v; }
  static float narrow(float v) { return v; }
};
struct Bf16Io {
  using T = uint16_t;
  static vfl load(const uint16_t* p) { return bload(p); }
  static vfl round(vfl v) { return bround(v); }
  static void store(uint16_t* p, vfl v) { bstore(p, v); }
  static float widen(uint16_t v) { return bf16_float(v); }
  static uint16_t narrow(float v) { return bf16_round(v); }
};

// h = round(h + residual); out = round(weight * round(h * r)), r from the float32 sum of squares of the rounded h
template <class Io, class T = typename Io::T>
void glue_rms_norm_t(T* h, const T* residual, const T* weight, int64_t rows, int64_t n, float eps, T* out) {
  const int64_t nv = n - n % kVL;
  for (int64_t r = 0; r < rows; ++r) {
    T* hr = h + r * n;
    T* o = out + r * n;
    if (residual) {
      const T* res = residual + r * n;
      for (int64_t i = 0; i < nv; i += kVL) Io::store(hr + i, Io::round(Io::load(hr + i) + Io::load(res + i)));
      for (int64_t j = nv; j < n; ++j) hr[j] = Io::narrow(Io::widen(hr[j]) + Io::widen(res[j]));
    }
    vfl s0 = vfl{}, s1 = vfl{};  // two chains of partial sums of squares
    int64_t i = 0;
    for (; i + 2 * kVL <= nv; i += 2 * kVL) {
      const vfl a = Io::load(hr + i), b = Io::load(hr + i + kVL);
      s0 += a * a;
      s1 += b * b;
    }
    for (; i < nv; i += kVL) {
      const vfl a = Io::load(hr + i);
      s0 += a * a;
    }
    s0 += s1;
    double ss = 0.0;
    for (int l = 0; l < kVL; ++l) ss += s0[l];
    for (int64_t j = nv; j < n; ++j) ss += static_cast<double>(Io::widen(hr[j])) * Io::widen(hr[j]);
    const float inv = 1.f / std::sqrt(static_cast<float>(ss) / static_cast<float>(n) + eps);
    const vfl iv = vfl{} + inv;
    for (i = 0; i < nv; i += kVL) Io::store(o + i, Io::round(Io::load(weight + i) * Io::round(Io::load(hr + i) * iv)));
    for (int64_t j = nv; j < n; ++j) o[j] = Io::narrow(Io::widen(weight[j]) * Io::widen(Io::narrow(Io::widen(hr[j]) * inv)));
  }
}

// out = round(round(silu(gate)) * up) per row of gate_up = [gate | up]
template <class Io, class T = typename Io::T>
void glue_swiglu_t(const T* gate_up, int64_t rows, int64_t f, T* out) {
  const int64_t nv = f - f % kVL;
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate_up + r * 2 * f;
    const T* u = g + f;
    T* o = out + r * f;
    for (int64_t i = 0; i < nv; i += kVL) Io::store(o + i, Io::round(Io::round(silu(Io::load(g + i))) * Io::load(u + i)));
    if (nv < f) {  // the tail through one zero-padded vector
      vfl gt = vfl{}, ut = vfl{};
      for (int64_t j = nv; j < f; ++j) {
        gt[j - nv] = Io::widen(g[j]);
        ut[j - nv] = Io::widen(u[j]);
      }
      const vfl ot = Io::round(Io::round(silu(gt)) * ut);
      for (int64_t j = nv; j < f; ++j) o[j] = Io::narrow(ot[j - nv]);  // exact: ot is rounded
    }
  }
}

}  // namespace
}  // namespace sf

#define SF_DEFINE_GLUE_KERNELS                                                              \
  extern const GlueKernels glue_kernels = {glue_rms_norm_t<F32Io>, glue_swiglu_t<F32Io>, \
                                           glue_rms_norm_t<Bf16Io>, glue_swiglu_t<Bf16Io>};
