// Dense bf16 matrix-vector product for decode (batch 1, or a few rows): y (B, out) = x (B, in) @ W^T
// (+ bias), with W (out, in) and x in bfloat16, products summed in float32, y float32 or bfloat16
// (rounded to nearest even once, after the bias).
//
// At batch 1 the product is memory bound: every weight byte is read once per call, so the kernel
// streams R weight rows at a time (R sequential streams, each row its own float32 accumulator vectors)
// and reduces each row's vectors at the end: R = 8, one vector per row and step, each row prefetched
// kDenseBf16PrefetchBytes ahead, except on AVX2 (4 rows, no software prefetch). Paths, chosen at run time
// (csrc/isa.h):
//   avx512 + AVX512_BF16  vdpbf16ps on 32 bf16 per row and step (x used as bf16; what llama.cpp does)
//   avx512                16 bf16 widened to float32 by a shift, FMA with x widened once per call
//   avx2                  16 bf16 per row and step split into their even and odd columns by a shift and an
//                         AND (no shuffle), FMAs with x widened once per call into that pair layout
//   scalar                the same with the portable vector width (SSE on x86-64)
// Within the avx512 path SPARSEFORGE_AVX512_BF16=0 runs the widening kernel (isa.h, use_avx512_bf16).
//
// Layouts (little-endian, C-contiguous): W uint16 bf16 bits (out, in); x uint16 bf16 bits (B, in);
// bias float32 (out,) or null; y float32 (B, out) or uint16 bf16 bits (B, out).
//
// Order of the float32 sums: each row is summed by one task with the same code whatever the thread
// count, so results are bitwise independent of the threads; the paths differ from each other (and
// from the scalar reference, which sums in column order) in summation order only. vdpbf16ps treats
// bf16 subnormals as zero and flushes subnormal results (the widening paths do not). NaN / inf
// propagate as in a dense product (no fast-math).
#pragma once

#include "common.h"

namespace sf {

// Rows in flight and software prefetch distance per row. One core, vdpbf16ps, weights from memory, CPU-time
// GB/s on a Sapphire Rapids-class Xeon (contended host): 4 rows 13.4-14.0, 8 rows 13.9-14.4, 4 rows + 512 B
// prefetch 14.1-15.3, 8 rows + 512 B 14.7-15.8, 16 rows + 512 B 14.7-16.1 (2048x2048, 11264x2048, 2048x5632).
constexpr int kDenseBf16Rows = 8;
constexpr int64_t kDenseBf16PrefetchBytes = 512;

struct DenseBf16Problem {
  const uint16_t* w = nullptr;  // (out, in) bf16 bits
  int64_t out = 0, in = 0;
  const uint16_t* x = nullptr;  // (B, in) bf16 bits
  int64_t B = 0;
  const float* bias = nullptr;  // (out,) or null
  float* y32 = nullptr;         // (B, out) float32 ...
  uint16_t* y16 = nullptr;      // ... or bf16 bits: exactly one of the two
};

// dots[i] = sum_k W[i, k] * x[k] for rows i < nrows of W (row stride `in`), x as bf16 bits (xb) and widened
// to float32 (xf); a kernel reads the one it needs.
using DenseBf16DotsFn = void (*)(const uint16_t* W, int64_t in, const uint16_t* xb, const float* xf, int64_t nrows,
                                 float* dots);

// xf from x (bf16 bits, one row of `in`): float32 in the order a path's dots read it
using DenseBf16WidenFn = void (*)(const uint16_t* x, int64_t in, float* xf);

namespace scalar { extern const DenseBf16DotsFn dense_bf16_dots; }
namespace avx2 {
extern const DenseBf16DotsFn dense_bf16_dots;
extern const DenseBf16WidenFn dense_bf16_widen;  // the pair layout (dense_bf16_kernels.h)
}  // namespace avx2
namespace avx512 { extern const DenseBf16DotsFn dense_bf16_dots; }
namespace avx512bf16 { extern const DenseBf16DotsFn dense_bf16_dots; }  // vdpbf16ps

// Multithreaded (rows split over the thread pool). Throws std::invalid_argument for bad sizes or
// pointers. Returns the name of the kernel that ran ("avx512_bf16", "avx512", "avx2", "scalar").
const char* dense_bf16_gemv(const DenseBf16Problem& p, Isa isa);
// Kernel name a call with `isa` would run now.
const char* dense_bf16_kernel_name(Isa isa);
// Scalar reference (the test oracle): float32 sums in column order, then the bias, then the output rounding.
void dense_bf16_gemv_ref(const DenseBf16Problem& p);

}  // namespace sf
