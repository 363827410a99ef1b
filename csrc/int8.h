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
// name, converted to float32 and multiplied into float32 x with FMA; 2:4 on AVX-512 instead picks
// the x of 16 values' columns out of two x vectors with vpermt2ps (positions from the index bits)
// and multiplies the converted values in place; CSR: 16 / 8 values at a time sign-extended and
// converted, x gathered at their columns, FMA. With AVX512 VNNI + VBMI + VBMI2 the bitmap and N:M rows
// kernels of the float32 mode (N:M other than 2:4) take the fixed-point walk instead (FixedX below: x as three limb bytes of a
// 24-bit fixed point, exact integer sums by vpdpbusd). For batch >= 4 (or algo=lanes) the driver
// dequantizes one row block at a time into a float32 buffer and runs the float32 batch-in-lanes
// kernels of the format on it (bitmap.h, nm.h).
//
// Activation mode I8Act::int8 (bitmap and N:M; opt-in, changes the numerics): each batch row of x
// is quantized once per call, symmetric, xq[b, j] = clamp(nearbyint(x[b, j] * 127 / amax_b), +-127)
// with sx[b] = amax_b / 127 (amax_b = max_j |x[b, j]|; 0 gives sx = 0 and xq = 0), and
//   y[b, r] = scales[r] * (sx[b] * float(sum_j q[r, j] * xq[b, j])) + bias[r]
// with the integer sum exact (int64). With AVX512 VNNI + VBMI + VBMI2 (use_int8_vnni()) the rows
// kernels gather the x bytes of the stored values (2:4: vpermt2b with positions from the index
// bits via vpmultishiftqb; bitmap: vpcompressb by the bitmap's 64-bit masks) and multiply 64 values
// per vpdpbusd ((q + 128) as u8 times xq as s8, minus 128 * sum xq by a second vpdpbusd). Without
// them (and on AVX2) 32 values per step: 2:4 gathers the x bytes with vpshufb, bitmap expands the
// values to their columns with vpshufb, |q| times sign(xq, q) by vpdpbusd ymm (AVX-VNNI) or
// vpmaddubsw + vpmaddwd; other n:m run the bitmap kernels on decoded positions. The scalar path is
// a portable integer loop. All give the same result. Every batch size runs the rows kernels; a
// call whose x holds NaN or inf runs the float32 mode instead (NaN / inf propagate as in a dense
// matmul, which a quantized x cannot express). The deviation from the float32 mode is bounded by
//   |y_int8 - y_f32| <= scales[r] * sum_j |q[r, j]| * sx[b] / 2   (plus float32 rounding).
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

// x quantized per batch row (I8Act::int8): q (B, ld) int8 with zeros in [in, ld), scale (B,).
struct QuantX {
  const int8_t* q = nullptr;
  int64_t ld = 0;  // row stride: in rounded up to 64, plus 128 (the kernels read whole 64-byte windows)
  const float* scale = nullptr;
};
constexpr int64_t kQuantXPad = 128;
inline int64_t quant_x_ld(int64_t in) { return (in + 63) / 64 * 64 + kQuantXPad; }

enum class I8Act : int { f32 = 0, int8 = 1 };

// The float32 mode's fixed-point walk (AVX512 VNNI + VBMI + VBMI2, batch 1-3 rows kernels of the bitmap
// and of N:M other than 2:4): x of each batch row as a 24-bit fixed-point integer, X[j] = clamp(nearbyint(x[j] * inv),
// +-kFxMax) with inv = kFxMax / amax (float32 multiply, round to nearest even; amax = max_j |x[j]|, 0 gives
// inv = 0), stored as the three bytes of X in two's complement (limb planes: l0, l1 unsigned, h signed). The row
// sums are exact integers: with Q[j] = q[r, j] at the stored columns and 0 elsewhere,
//   sum_j Q[j] * X[j] = sum_j Q[j] * l0[j] + 256 * sum_j Q[j] * l1[j] + 2^16 * (sum_j (Q[j] + 128) * h[j] - 128 * H)
// over every column j, H = sum_j h[j] (FixedX::top_sum, once per call). vpdpbusd multiplies 64 bytes per
// instruction (u8 by s8: l0, l1 by Q, and Q + 128 by h), so the walk costs one vpexpandb of the values, one
// flip of their sign bit and three vpdpbusd per 64 columns instead of four widen / convert / FMA chains, and
//   y[b, r] = scales[r] * (sx[b] * sum) + bias[r],  sx[b] = amax_b / kFxMax,
// in double, rounded once to float32 (fx_output). The deviation from the exact product is at most
// scales[r] * sum_j |q[r, j]| * sx[b] / 2 (x rounded to 2^-24 of its largest element), below the float32
// FMA walk's own rounding bound for x of one magnitude; the result does not depend on summation order.
// The driver takes this walk for act=float where the kernel table has it, x is finite and amax >= kFxMinAmax
// (else the FMA walk); SPARSEFORGE_INT8_WALK=fma selects the FMA walk (int8_float_walk).
constexpr int kFxLimbs = 3;
constexpr int32_t kFxMax = (1 << 23) - 1;
constexpr float kFxMinAmax = 1e-30f;  // below it inv overflows float32: the FMA walk runs

// x as limb planes (see above): limbs (B, kFxLimbs, ld) with zeros in [in, ld), scale (B,), and per batch row
// the sum of the top plane's signed bytes (H above)
struct FixedX {
  const uint8_t* limbs = nullptr;
  int64_t ld = 0;  // quant_x_ld(in)
  const float* scale = nullptr;
  const int64_t* top_sum = nullptr;
};

// y of the fixed-point walk: scale * (sx * acc) + bias in double, rounded to float32 once (the volatile
// keeps the compiler from contracting the double multiply and add)
inline float fx_output(float scale, float sx, int64_t acc, float bias) {
  volatile double prod = static_cast<double>(scale) * (static_cast<double>(sx) * static_cast<double>(acc));
  return static_cast<float>(prod + static_cast<double>(bias));
}

// y = scale * (sx * float(acc)) + bias of I8Act::int8, rounded after each operation in every build
// (the volatile keeps the compiler from fusing the last multiply and add into an FMA)
inline float qx_output(float scale, float sx, int64_t acc, float bias) {
  volatile float prod = scale * (sx * static_cast<float>(acc));
  return prod + bias;
}

struct I8Kernels {
  void (*bitmap_rows)(const BitmapI8&, const Problem&, int64_t r0, int64_t r1);
  void (*nm_rows)(const NmI8&, const Problem&, int64_t r0, int64_t r1);
  void (*csr_rows)(const CsrI8&, const Problem&, int64_t r0, int64_t r1);
  // one row of x quantized into q[0, n) (see I8Act::int8), its scale returned
  float (*quantize_row)(const float* x, int64_t n, int8_t* q);
  void (*bitmap_rows_qx)(const BitmapI8&, const QuantX&, const Problem&, int64_t r0, int64_t r1);
  void (*nm_rows_qx)(const NmI8&, const QuantX&, const Problem&, int64_t r0, int64_t r1);
  // one row of x as the fixed-point walk's limb planes (limbs[k * ld + j], zeros in [n, ld)); returns
  // amax / kFxMax, or -1 (nothing written) when amax < kFxMinAmax and > 0
  float (*fixed_row)(const float* x, int64_t n, uint8_t* limbs, int64_t ld);
  // the float32 mode's fixed-point walk; nullptr where the table has none (the FMA walk runs)
  void (*bitmap_rows_fx)(const BitmapI8&, const FixedX&, const Problem&, int64_t r0, int64_t r1);
  void (*nm_rows_fx)(const NmI8&, const FixedX&, const Problem&, int64_t r0, int64_t r1);
};

namespace scalar { extern const I8Kernels i8; }
namespace avx2 { extern const I8Kernels i8; }
namespace avx512 { extern const I8Kernels i8; }
namespace avx512vnni { extern const I8Kernels i8; }  // avx512 + VNNI, VBMI, VBMI2 (the int8-activation kernels)
namespace avx2vnni { extern const I8Kernels i8; }  // avx2 + AVX-VNNI (vpdpbusd on ymm)

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
void bitmap_i8_linear(const BitmapI8& w, const Problem& p, Isa isa, int algo, I8Act act = I8Act::f32);
void nm_i8_linear_ref(const NmI8& w, const Problem& p);
void nm_i8_linear(const NmI8& w, const Problem& p, Isa isa, int algo, I8Act act = I8Act::f32);
// references of the I8Act::int8 mode: x quantized by the formula above, each row decoded to dense
// int8 and summed in int64 (NaN / inf in x: the float32 reference)
void bitmap_i8_linear_qx_ref(const BitmapI8& w, const Problem& p);
void nm_i8_linear_qx_ref(const NmI8& w, const Problem& p);
// Output rows the float32-activation rows kernels of 2:4 and of the bitmap (AVX-512) interleave in one
// loop: SPARSEFORGE_INT8_ROWS=1 or 2 (read on every call; unset: 1, measured faster, docs/kernels.md).
// Both give the same bits.
int int8_rows_in_flight();
// The I8Act::int8 rows kernels that run on ISA path isa: "avx512_vnni", "avx2_vnni", "avx2" or "portable".
const char* int8_act_path(Isa isa);
// references of the float32 mode's fixed-point walk: x as FixedX by the portable fixed_row, each row decoded
// to dense int8 and summed in int64, fx_output (NaN / inf in x, or amax < kFxMinAmax: the float32 reference)
void bitmap_i8_linear_fx_ref(const BitmapI8& w, const Problem& p);
void nm_i8_linear_fx_ref(const NmI8& w, const Problem& p);
// The walk a float32-activation call at batch 1-3 takes on ISA path isa for a bitmap weight (n = m = 0)
// or an n:m one: "fixed_x" (the fixed-point walk above) or "fma". 2:4 keeps "fma" (its vpermt2ps walk
// measured faster than three vpermt2b limb gathers on cold weights, docs/kernels.md);
// SPARSEFORGE_INT8_WALK=fma (read on every call) forces "fma"; unset or "auto": "fixed_x" where the
// kernel table has it.
const char* int8_float_walk(Isa isa, int n = 0, int m = 0);
void csr_i8_linear_ref(const CsrI8& w, const Problem& p);
void csr_i8_linear(const CsrI8& w, const Problem& p, Isa isa, int algo);

}  // namespace sf
