// int8 values with one float32 scale per output row, for bitmap, N:M and CSR weights.
//
// Layout: the structure buffers are exactly those of bitmap.h / nm.h / csr.h; the values are int8
// (the bitmap's and CSR's (nnz,), N:M's (rows, G*n)), and `scales` is float32 (rows,). The weight is
// W[r, j] = scales[r] * q[r, j]: symmetric, per output channel, no zero point. The products are
//   y[b, r] = scales[r] * sum_j q[r, j] * x[b, j] + bias[r]     (float32 accumulate)
// so every row multiplies by its scale once, after its dot product.
//
// Kernels: rows (any batch; used for batch 1-3): bitmap / N:M: each 16 (AVX-512) or 8 (AVX2) columns the next
// stored int8 values are loaded, sign-extended to int32, expanded to the columns their mask bits
// name, converted to float32 and multiplied into float32 x with FMA; CSR: 16 / 8 values at a time
// sign-extended and converted, x gathered at their columns, FMA. For batch >= 4 (or
// algo=lanes) the driver dequantizes one row block at a time into a float32 buffer and runs the
// float32 batch-in-lanes kernels of the format on it (bitmap.h, nm.h).
#pragma once

#include "bitmap.h"
#include "buffers.h"
#include "common.h"
#include "csr.h"
#include "nm.h"

namespace sf {

// A bitmap weight with int8 values: w.val points at the int8 values (w.vt is unused).
struct BitmapI8 {
  BitmapView w;
  const float* scales = nullptr;  // (rows,)
};

// An N:M weight with int8 values: w.val points at the int8 values (w.vt is unused).
struct NmI8 {
  NmView w;
  const float* scales = nullptr;  // (rows,)
};

// A CSR weight with int8 values: w.val points at the int8 values (w.vt is unused).
struct CsrI8 {
  CsrView w;
  const float* scales = nullptr;  // (rows,)
};

struct I8Kernels {
  void (*bitmap_rows)(const BitmapI8&, const Problem&, int64_t r0, int64_t r1);
  void (*nm_rows)(const NmI8&, const Problem&, int64_t r0, int64_t r1);
  void (*csr_rows)(const CsrI8&, const Problem&, int64_t r0, int64_t r1);
};

namespace scalar { extern const I8Kernels i8; }
namespace avx2 { extern const I8Kernels i8; }
namespace avx512 { extern const I8Kernels i8; }

// The scalar references (test oracles) and the dispatched kernels; algo as for bitmap_linear.
// Checked views (views.h): the structure buffers as bitmap_view / nm_view check them, values int8
// of the same shape, scales float32 (rows,), every scale finite and > 0 (InvalidWeight otherwise).
BitmapI8 bitmap_i8_view(const Array& bits, const Array& row_offsets, const Array& values, const Array& scales,
                        int64_t cols, const char* op, bool check_indices = true);
NmI8 nm_i8_view(const Array& values, const Array& indices, const Array& scales, int n, int m, int64_t cols,
                const char* op, bool check_indices = true);
CsrI8 csr_i8_view(const Array& row_ptr, const Array& col, const Array& values, const Array& scales, int64_t cols,
                  const char* op, bool check_indices = true);

void bitmap_i8_linear_ref(const BitmapI8& w, const Problem& p);
void bitmap_i8_linear(const BitmapI8& w, const Problem& p, Isa isa, int algo);
void nm_i8_linear_ref(const NmI8& w, const Problem& p);
void nm_i8_linear(const NmI8& w, const Problem& p, Isa isa, int algo);
void csr_i8_linear_ref(const CsrI8& w, const Problem& p);
void csr_i8_linear(const CsrI8& w, const Problem& p, Isa isa, int algo);

}  // namespace sf
