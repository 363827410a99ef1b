// float32-accurate GEMM from three bf16 products (bf16x3): C (M, N) = A (M, K) @ B (K, N), float32 in
// and out, computed as A_hi @ B_hi + A_lo @ B_hi + A_hi @ B_lo with every float32 operand split into
// bf16 parts X = X_hi + X_lo (X_hi = bf16(X), X_lo = bf16(X - X_hi), round to nearest even), all
// three products accumulated in the same float32 accumulators. The dropped term A_lo @ B_lo and the
// rounding of X_lo leave a relative error of about 2^-16 per product (float32: 2^-24), independent
// of K apart from the float32 accumulation. This is the same single bf16 GEMM with K tripled:
// [A_hi | A_lo | A_hi] @ [B_hi ; B_hi ; B_lo]. Reference: Henry, Tang, Heinecke, "Leveraging the
// bfloat16 Artificial Intelligence Datatype For Higher-Precision Computations" (ARITH 2019).
//
// Operands are split and packed once into tile-contiguous bf16 layouts (so B, a weight, is split
// once and reused across calls; A, the activations, per call):
//   A packed  uint16 [Mp / 16][Kp / 32][16 rows][32 k]          (one AMX A tile = 1 KB, contiguous)
//   B packed  uint16 [Np / 16][Kp / 32][16 k pairs][16 cols][2] (one AMX B tile, VNNI pairs)
// with Mp, Np, Kp the sizes rounded up to 32, zero padded. The sources are float32 with arbitrary
// strides (a transposed view is packed without a copy).
//
// Paths: amx (AMX-BF16 TDPBF16PS, 32 x 32 output blocks in four accumulator tiles) and scalar (the
// same packed operands multiplied in plain C++ float32: the reference and the fallback of tests).
// Specials: X_lo of an inf / NaN is 0; NaN propagates as in float32, an infinite input gives inf or
// NaN where float32 gives inf (a zero X_lo times the other operand's infinite hi part); AMX treats bf16 subnormals as zero, so parts below 2^-126 (|X| < ~2^-118 for X_lo) are
// flushed: an absolute error below 2^-118 per element, invisible at float32 output scales.
#pragma once

#include <cstdint>

#include "threadpool.h"

namespace sf {

enum class Bf16x3Path : int { scalar = 0, amx = 2 };

constexpr int64_t kX3Tile = 32;  // Mp, Np, Kp are multiples of this

inline int64_t x3_round(int64_t n) { return (n + kX3Tile - 1) / kX3Tile * kX3Tile; }

// float32 (rows, cols) at src with element strides (rs, cs) -> packed hi / lo parts (layouts above).
// pack_a: rows = M, cols = K; pack_b: rows = K, cols = N. Each buffer holds round(rows) * round(cols) uint16.
void bf16x3_pack_a(const float* src, int64_t M, int64_t K, int64_t rs, int64_t cs, uint16_t* hi, uint16_t* lo,
                   bool parallel = true);
void bf16x3_pack_b(const float* src, int64_t K, int64_t N, int64_t rs, int64_t cs, uint16_t* hi, uint16_t* lo,
                   bool parallel = true);
// element-wise split (n floats, contiguous) into hi / lo bf16 bits: the property the packers rely on
void bf16x3_split(const float* src, int64_t n, uint16_t* hi, uint16_t* lo);

struct Bf16x3Gemm {
  const uint16_t *a_hi = nullptr, *a_lo = nullptr;  // packed A
  const uint16_t *b_hi = nullptr, *b_lo = nullptr;  // packed B
  int64_t M = 0, N = 0, K = 0;                      // logical sizes (packs were made with these)
  float* c = nullptr;                               // (M, N) row stride ldc
  int64_t ldc = 0;
  bool accumulate = false;                          // C += A @ B instead of C = A @ B
};

bool bf16x3_path_supported(Bf16x3Path path);  // compiled, CPU flags, OS state, AMX permission
Bf16x3Path best_bf16x3_path();
// after: how the pool's workers wait once the product is done (threadpool.h); park when torch's own
// threads run next. Throws std::invalid_argument if the path is unsupported.
void bf16x3_gemm(const Bf16x3Gemm& g, Bf16x3Path path, bool parallel = true, AfterJob after = AfterJob::spin);

namespace amx {
// one 32 x 32 block: acc (32 x 32 float32, row stride 32) = (load ? acc : 0) + the three products
// over ks k-steps of 32; a_hi / a_lo / b_hi / b_lo point at the first k-step's tile of the block's
// first 16 rows / columns, a_next / b_next (uint16) from there to the next 16 rows / columns
void bf16x3_block(const uint16_t* a_hi, const uint16_t* a_lo, const uint16_t* b_hi, const uint16_t* b_lo,
                  int64_t a_next, int64_t b_next, int64_t ks, float* acc, bool load);
void bf16x3_tiles_begin();
void bf16x3_tiles_end();
}  // namespace amx

}  // namespace sf
