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
};

namespace scalar { extern const GlueKernels glue_kernels; }
namespace avx2 { extern const GlueKernels glue_kernels; }
namespace avx512 { extern const GlueKernels glue_kernels; }

// residual may be null; h and out may not overlap residual or each other
void rms_norm(float* h, const float* residual, const float* weight, int64_t rows, int64_t n, float eps, float* out, Isa isa);
void rms_norm_ref(float* h, const float* residual, const float* weight, int64_t rows, int64_t n, float eps, float* out);
void swiglu(const float* gate_up, int64_t rows, int64_t f, float* out, Isa isa);
void swiglu_ref(const float* gate_up, int64_t rows, int64_t f, float* out);

struct RopeKvProblem {
  const float* qkv = nullptr;   // ((Hq + 2 Hkv) D,)
  const float* cos = nullptr;   // (D,)
  const float* ssin = nullptr;  // (D,): -sin over the first half, +sin over the second
  int64_t Hq = 0, Hkv = 0, D = 0;
  float* q_out = nullptr;       // (Hq, D)
  float* k = nullptr;           // (Hkv, cap, D)
  float* v = nullptr;           // (Hkv, cap, D)
  int64_t cap = 0, pos = 0;
};
void rope_kv(const RopeKvProblem& p);  // throws std::invalid_argument for sizes out of range

}  // namespace sf
