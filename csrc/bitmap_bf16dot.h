// Batch-1 product of a bitmap weight with bfloat16 values and an x whose elements are bfloat16
// values (a model running in bf16 passes its activations so), on AVX512_BF16 + AVX512_VBMI2
// (bitmap_bf16dot_avx512.cpp): per 32 columns the row's next stored values are expand-loaded to
// their columns (vpexpandw) and vdpbf16ps multiplies them with 32 bf16 of x, two products per
// float32 lane; four 32-column steps per iteration, each with its own accumulator. Every product is
// exact in float32; the sums are float32 in another order than the FMA walk, and vdpbf16ps treats
// bf16 subnormals (magnitude below 1.2e-38) as zero, inputs and results. Where x holds a value that
// is not a bf16 value (low 16 bits set), a NaN or an infinity, the FMA walk runs instead: with a
// float32 x the split into bf16 pieces (x = hi + mid + lo) costs three vdpbf16ps per 32 columns
// and measured no faster than the FMA walk on the AVX-512 host (docs/kernels.md).
#pragma once

#include "bitmap.h"

namespace sf {

// The walk is built in and this CPU has AVX512_BF16 and AVX512_VBMI2 (use_avx512_bf16() and
// use_avx512_vbmi2(), so SPARSEFORGE_AVX512_BF16=0 or SPARSEFORGE_VBMI2=0 turn it off).
bool bitmap_bf16dot_available();

// Rows [r0, r1) of y = x @ W^T + bias for bf16 values, x given as its bf16 bits `xb` (zero-padded to
// a multiple of 32 columns). Only the walk lives in the AVX-512 file; the thread split and the
// packing of x run in portable code (bitmap.cpp), so no inline function with external linkage is
// compiled with AVX-512 flags.
void bitmap_bf16dot_rows(const BitmapView& w, const uint16_t* xb, const float* bias, float* y, int64_t r0, int64_t r1);

}  // namespace sf
