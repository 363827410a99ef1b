// The element-wise steps of a decoder layer between its projections, for a batch-1 decode step in
// float32 (the native decode engine, sparseforge/generation/engine.py): one call each where torch
// takes five to eight small ops (each a few microseconds of dispatch at these sizes).
//
//   rms_norm   h += residual (optional, in place), then out = weight * (h * r) per row, with
//              r = 1 / sqrt(sum(h^2) / n + eps): Llama's RMSNorm (LlamaRMSNorm, in that product order)
//   swiglu     out = silu(gate) * up per row of gate_up (rows, 2f) = [gate | up]: Llama's MLP between
//              its gate/up and down projections; silu(g) = g / (1 + e^-g) with e^-|g| from the
//              vectorised exp of vec_exp.h (g >= 0: g / (1 + e), else g e / (1 + e))
//   rope_kv    the rotary embedding of q and k at one position from its cos / signed-sin rows (D each:
//              out[i] = x[i] cos[i] + x[i ^ half] ssin[i], ssin = [-sin, +sin] over the two halves, the
//              model's q cos + rotate_half(q) sin), q into q_out (Hq, D), k and v into the KV cache at pos
//
// Layouts: float32, C-contiguous. h, residual, out (rows, n); weight (n,); gate_up (rows, 2f), out
// (rows, f); qkv ((Hq + 2 Hkv) D,) as q heads, k heads, v heads; cos / ssin (D,); q_out (Hq, D); k / v
// caches (Hkv, cap, D) of batch 0.
//
// Paths (isa.h): avx512, avx2 and the portable vector width, all the same code (decode_glue_kernels.h);
// the sum of squares is a vector of partial sums (its order differs from torch's and between paths) and
// the exp is a polynomial (a few ulp), so outputs agree with torch to float32 rounding, not bitwise.
// rope_kv is exact (two products and a sum, no FMA: -ffp-contract=off). NaN / inf propagate.
// The *_ref functions are the scalar oracles (double sums, std::exp).
#pragma once

#include "common.h"

namespace sf {

struct GlueKernels {
  void (*rms_norm)(float* h, const float* residual, const float* weight, int64_t rows, int64_t n, float eps, float* out);
  void (*swiglu)(const float* gate_up, int64_t rows, int64_t f, float* out);
  void (*rms_norm_bf16)(uint16_t* h, const uint16_t* residual, const uint16_t* weight, int64_t rows, int64_t n, float eps,
                        uint16_t* out);
  void (*swiglu_bf16)(const uint16_t* gate_up, int64_t rows, int64_t f, uint16_t* out);
};

namespace {
// bfloat16 bits <-> float32: widening is exact; rounding to nearest even as torch (c10::BFloat16) rounds, NaN as
// the quiet 0x7fc0
inline float bf16_float(uint16_t b) {
  const uint32_t w = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
inline uint16_t bf16_round(float f) {
  if (f != f) return 0x7fc0;
  uint32_t w;
  std::memcpy(&w, &f, sizeof w);
  return static_cast<uint16_t>((w + 0x7fffu + ((w >> 16) & 1u)) >> 16);
}
}  // namespace

namespace scalar { extern const GlueKernels glue_kernels; }
namespace avx2 { extern const GlueKernels glue_kernels; }
namespace avx512 { extern const GlueKernels glue_kernels; }

// residual may be null; h and out may not overlap residual or each other
void rms_norm(float* h, const float* residual, const float* weight, int64_t rows, int64_t n, float eps, float* out, Isa isa);
void rms_norm_ref(float* h, const float* residual, const float* weight, int64_t rows, int64_t n, float eps, float* out);
void swiglu(const float* gate_up, int64_t rows, int64_t f, float* out, Isa isa);
void swiglu_ref(const float* gate_up, int64_t rows, int64_t f, float* out);
// bfloat16 (raw uint16 bits) h, residual, weight, out / gate_up, out: the model's bf16 rounding points. RMSNorm:
// h = round(h + residual), the norm in float32, round(weight * round(h * r)); SwiGLU: round(round(silu(gate)) * up)
void rms_norm_bf16(uint16_t* h, const uint16_t* residual, const uint16_t* weight, int64_t rows, int64_t n, float eps,
                   uint16_t* out, Isa isa);
void rms_norm_bf16_ref(uint16_t* h, const uint16_t* residual, const uint16_t* weight, int64_t rows, int64_t n, float eps,
                       uint16_t* out);
void swiglu_bf16(const uint16_t* gate_up, int64_t rows, int64_t f, uint16_t* out, Isa isa);
void swiglu_bf16_ref(const uint16_t* gate_up, int64_t rows, int64_t f, uint16_t* out);
// out[i] = round(src[i]): float32 to bfloat16 bits
void to_bf16(const float* src, int64_t n, uint16_t* out);

// vt f32: every buffer float32; vt bf16: qkv, cos, ssin, k and v bfloat16 bits (each product and the sum rounded,
// as the model's bf16 rotary), q_out float32 (the rotated bf16 q widened, for the attention kernel)
struct RopeKvProblem {
  VT vt = VT::f32;
  const void* qkv = nullptr;   // ((Hq + 2 Hkv) D,)
  const void* cos = nullptr;   // (D,)
  const void* ssin = nullptr;  // (D,): -sin over the first half, +sin over the second
  int64_t Hq = 0, Hkv = 0, D = 0;
  float* q_out = nullptr;      // (Hq, D), float32
  void* k = nullptr;           // (Hkv, cap, D)
  void* v = nullptr;           // (Hkv, cap, D)
  int64_t cap = 0, pos = 0;
};
void rope_kv(const RopeKvProblem& p);  // throws std::invalid_argument for sizes out of range

}  // namespace sf
