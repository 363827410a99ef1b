// int8-valued bitmap / N:M / CSR: scalar references (test oracles), the portable row kernels
// (int8_kernels.h), and the driver: rows kernels for small batches, and for larger ones each row
// block dequantized into a float32 buffer and multiplied by the format's float32 lanes kernels.
#include "int8.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "driver.h"
#include "int8_kernels.h"
#include "isa.h"
#include "threadpool.h"
#include "views.h"

namespace sf {

namespace scalar {
extern const I8Kernels i8 = kI8Kernels;
}  // namespace scalar

namespace {

const I8Kernels& i8_kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
#if defined(SF_HAVE_INT8_VNNI_KERNELS)
  if (isa == Isa::avx512 && use_int8_vnni()) return avx512vnni::i8;
#endif
  if (isa == Isa::avx512) return avx512::i8;
#if defined(SF_HAVE_INT8_AVX_VNNI_KERNELS)
  if (isa == Isa::avx2 && use_int8_avx_vnni()) return avx2vnni::i8;
#endif
  if (isa == Isa::avx2) return avx2::i8;
#endif
  (void)isa;
  return scalar::i8;
}

// f(column, value index) for each stored entry of row r (bitmap.h / nm.h, independent of the kernels)
template <class F>
void stored(const BitmapView& w, int64_t r, F&& f) { bitmap_stored(w, r, f); }
template <class F>
void stored(const NmView& w, int64_t r, F&& f) { nm_stored(w, r, f); }
template <class F>
void stored(const CsrView& w, int64_t r, F&& f) { csr_stored(w, r, f); }

// The reference: y[b, r] = scales[r] * sum_j q[r, j] * x[b, j] + bias[r], the row's int8 values
// decoded to a dense float row first.
template <class View>
void i8_linear_ref(const View& w, const float* scales, const Problem& p) {
  detail::check_problem(w.rows, w.cols, p);
  const int8_t* q = static_cast<const int8_t*>(w.val);
  std::vector<float> row(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    for (auto& v : row) v = 0.f;
    stored(w, r, [&](int64_t j, int64_t k) { row[j] = static_cast<float>(q[k]); });
    for (int64_t b = 0; b < p.B; ++b) {
      float acc = 0.f;
      for (int64_t j = 0; j < w.cols; ++j) acc += row[j] * p.x[b * p.in + j];
      p.y[b * p.out + r] = scales[r] * acc + (p.bias ? p.bias[r] : 0.f);
    }
  }
}

// The stored columns of a row as a decoder for detail::fix_nonfinite (values are not read).
template <class View>
struct ColsDec {
  const View& w;
  struct Cur { int64_t r; };
  Cur begin(int64_t r) const { return {r}; }
  template <class F>
  void run(Cur& c, int64_t, F&& f) const { stored(w, c.r, [&](int64_t j, int64_t) { f(j, 0.f); }); }
};

// Row block [r0, r1) dequantized (float32, the format's own layout) into this thread's buffer.
thread_local std::vector<float> tl_values;
thread_local std::vector<int64_t> tl_offsets;
thread_local std::vector<int32_t> tl_ptr;

// Rows [r0, r1) of a weight whose row r owns values [ptr[r], ptr[r + 1]) (bitmap row_offsets, CSR
// row_ptr): scales[r] * q into tl_values from index 0, the pointers rebased to 0 into offs
// (r1 - r0 + 1 entries). Returns the block's value count.
template <class P>
int64_t dequantize_block(const P* ptr, const void* values, const float* scales, int64_t r0, int64_t r1,
                         std::vector<P>& offs) {
  const int64_t base = ptr[r0], n = ptr[r1] - base;
  tl_values.resize(static_cast<size_t>(n > 0 ? n : 1));
  offs.resize(static_cast<size_t>(r1 - r0 + 1));
  const int8_t* q = static_cast<const int8_t*>(values);
  for (int64_t r = r0; r < r1; ++r) {
    offs[r - r0] = static_cast<P>(ptr[r] - base);
    const float s = scales[r];
    for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) tl_values[k - base] = s * static_cast<float>(q[k]);
  }
  offs[r1 - r0] = static_cast<P>(n);
  return n;
}

// values as the float32 view builders expect them: same shape (the builders read no value)
Array as_f32(const Array& values, const char* op) {
  expect_dtype(values, op, "values", DType::i8);
  Array a = values;
  a.dtype = DType::f32;
  return a;
}

const float* checked_scales(const Array& scales, int64_t rows, const char* op, bool check_values) {
  expect_ndim(scales, op, "scales", 1);
  expect_dtype(scales, op, "scales", DType::f32);
  if (scales.dim(0) != rows) bad_weight(op, "scales must have one entry per row (" + std::to_string(rows) + "), got " + std::to_string(scales.dim(0)));
  const float* s = static_cast<const float*>(scales.data);
  for (int64_t r = 0; check_values && r < rows; ++r) {
    if (!(s[r] > 0.f && s[r] <= 3.4028235e38f)) bad_weight(op, "scales[" + std::to_string(r) + "] = " + std::to_string(s[r]) + " must be finite and > 0");
  }
  return s;
}

// The float32 sub-view of rows [r0, r1) of an int8 weight, its values dequantized (scales[r] * q, the
// format's own layout) into this thread's buffers; the sub-view's row i is the weight's row r0 + i.
BitmapView dequantized(const BitmapI8& wq, int64_t r0, int64_t r1) {
  const BitmapView& w = wq.w;
  BitmapView sub = w;
  sub.nnz = dequantize_block(w.row_offsets, w.val, wq.scales, r0, r1, tl_offsets);
  sub.rows = r1 - r0;
  sub.bits = w.bits + r0 * w.bpr;
  sub.row_offsets = tl_offsets.data();
  sub.val = tl_values.data();
  sub.vt = VT::f32;
  return sub;
}

NmView dequantized(const NmI8& wq, int64_t r0, int64_t r1) {
  const NmView& w = wq.w;
  const int64_t n = (r1 - r0) * w.vpr;
  tl_values.resize(static_cast<size_t>(n > 0 ? n : 1));
  const int8_t* q = static_cast<const int8_t*>(w.val) + r0 * w.vpr;
  for (int64_t r = 0; r < r1 - r0; ++r) {
    const float s = wq.scales[r0 + r];
    for (int64_t k = 0; k < w.vpr; ++k) tl_values[r * w.vpr + k] = s * static_cast<float>(q[r * w.vpr + k]);
  }
  NmView sub = w;
  sub.rows = r1 - r0;
  sub.idx = w.idx + r0 * w.ibpr;
  sub.val = tl_values.data();
  sub.vt = VT::f32;
  return sub;
}

CsrView dequantized(const CsrI8& wq, int64_t r0, int64_t r1) {
  const CsrView& w = wq.w;
  CsrView sub = w;
  sub.nnz = dequantize_block(w.row_ptr, w.val, wq.scales, r0, r1, tl_ptr);
  sub.rows = r1 - r0;
  sub.row_ptr = tl_ptr.data();
  sub.col = static_cast<const char*>(w.col) + int64_t{w.row_ptr[r0]} * (w.col_u16 ? 2 : 4);
  sub.val = tl_values.data();
  sub.vt = VT::f32;
  return sub;
}

// The kernel table run_linear drives: the int8 rows kernel `rows_fn` of i8, and the format's float32
// lanes kernel over a dequantized row block.
template <class W, class F32>
struct I8Run {
  const I8Kernels& i8;
  const F32& f32;
  void (*I8Kernels::*rows_fn)(const W&, const Problem&, int64_t, int64_t);
  void rows(const W& w, const Problem& p, int64_t r0, int64_t r1) const { (i8.*rows_fn)(w, p, r0, r1); }
  void lanes(const W& wq, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) const {
    Problem shifted = p;  // outputs (and bias) from row r0
    shifted.y = p.y + r0;
    shifted.bias = p.bias ? p.bias + r0 : nullptr;
    f32.lanes(dequantized(wq, r0, r1), shifted, lp, 0, r1 - r0, ybuf);
  }
};

// n bytes aligned to 64 (the kernels' 64-byte loads of x rows, whose strides are multiples of 64, stay
// within one cache line each)
inline uint8_t* aligned_bytes(detail::AlignedFloats& buf, int64_t n) {
  buf.reset((n + 3) / 4);
  return reinterpret_cast<uint8_t*>(buf.get());
}

// x quantized per batch row into buffers the QuantX view points at (I8Act::int8)
struct QuantXBuffers {
  detail::AlignedFloats q;
  std::vector<float> scale;
  QuantX view(const Problem& p, const I8Kernels& k) {
    const int64_t ld = quant_x_ld(p.in);
    int8_t* xq = reinterpret_cast<int8_t*>(aligned_bytes(q, p.B * ld));
    std::memset(xq, 0, static_cast<size_t>(p.B * ld));
    scale.resize(static_cast<size_t>(p.B));
    for (int64_t b = 0; b < p.B; ++b) scale[b] = k.quantize_row(p.x + b * p.in, p.in, xq + b * ld);
    return {xq, ld, scale.data()};
  }
};

// y[b, r] = out(r, b, exact sum_j q[r, j] * xi(b, j)) for every row and batch row, each row decoded to
// dense int8 (the references of the integer modes)
template <class W, class XFn, class OutFn>
void int_rows_ref(const W& wq, const Problem& p, XFn&& xi, OutFn&& out) {
  const int8_t* q = static_cast<const int8_t*>(wq.w.val);
  std::vector<int8_t> row(static_cast<size_t>(wq.w.cols));
  for (int64_t r = 0; r < wq.w.rows; ++r) {
    std::fill(row.begin(), row.end(), int8_t{0});
    stored(wq.w, r, [&](int64_t j, int64_t k) { row[j] = q[k]; });
    for (int64_t b = 0; b < p.B; ++b) {
      int64_t acc = 0;
      for (int64_t j = 0; j < wq.w.cols; ++j) acc += int64_t{row[j]} * xi(b, j);
      p.y[b * p.out + r] = out(r, b, acc);
    }
  }
}

// The reference of I8Act::int8: x quantized by the portable formula, each row decoded to dense int8
// and summed exactly; NaN / inf in x: the float32 reference.
template <class W>
void i8_linear_qx_ref(const W& wq, const Problem& p) {
  detail::check_problem(wq.w.rows, wq.w.cols, p);
  if (detail::any_nonfinite(p.x, p.B * p.in)) return i8_linear_ref(wq.w, wq.scales, p);
  QuantXBuffers buf;
  const QuantX xq = buf.view(p, scalar::i8);
  int_rows_ref(wq, p, [&](int64_t b, int64_t j) { return int64_t{xq.q[b * xq.ld + j]}; },
               [&](int64_t r, int64_t b, int64_t acc) { return qx_output(wq.scales[r], xq.scale[b], acc, p.bias ? p.bias[r] : 0.f); });
}


// I8Act::int8: quantize x once, then the rows kernels rows_qx over row tasks as run_linear splits them.
// Returns false (nothing done) when x holds NaN / inf: the caller runs the float32 mode.
template <class W, class RowsQx>
bool run_linear_qx(const W& w, const Problem& p, const I8Kernels& k, int algo, int64_t nnz, RowsQx rows_qx) {
  if (algo == 2) throw std::invalid_argument("act='int8' runs the rows kernels; algo='lanes' is float32 only (use auto or rows)");
  if (detail::any_nonfinite(p.x, p.B * p.in)) return false;
  if (p.B == 0 || p.out == 0) return true;
  QuantXBuffers buf;
  const QuantX xq = buf.view(p, k);
  detail::for_row_tasks(p, nnz, [&](int64_t r0, int64_t r1) { (k.*rows_qx)(w, xq, p, r0, r1); });
  return true;
}

// x as the fixed-point walk's limb planes (int8.h FixedX), per batch row
struct FixedXBuffers {
  detail::AlignedFloats limbs;
  std::vector<float> scale;
  std::vector<int64_t> top_sum;
  // false (nothing usable) when some row's amax is below kFxMinAmax
  bool fill(const Problem& p, const I8Kernels& k, FixedX& fx) {
    fx.ld = quant_x_ld(p.in);
    uint8_t* l = aligned_bytes(limbs, p.B * kFxLimbs * fx.ld);
    scale.resize(static_cast<size_t>(p.B));
    top_sum.resize(static_cast<size_t>(p.B));
    for (int64_t b = 0; b < p.B; ++b) {
      uint8_t* lb = l + b * kFxLimbs * fx.ld;
      scale[b] = k.fixed_row(p.x + b * p.in, p.in, lb, fx.ld);
      if (scale[b] < 0.f) return false;
      const int8_t* top = reinterpret_cast<const int8_t*>(lb + 2 * fx.ld);
      int64_t h = 0;
      for (int64_t j = 0; j < p.in; ++j) h += top[j];
      top_sum[b] = h;
    }
    fx.limbs = l;
    fx.scale = scale.data();
    fx.top_sum = top_sum.data();
    return true;
  }
};

bool float_walk_forced_fma() {
  const char* env = std::getenv("SPARSEFORGE_INT8_WALK");
  if (env == nullptr || *env == '\0') return false;
  const std::string v = env;
  if (v == "auto") return false;
  if (v == "fma") return true;
  throw std::invalid_argument("SPARSEFORGE_INT8_WALK='" + v + "' is not a walk; use auto or fma");
}

// The float32 mode's fixed-point walk (int8.h): where the table has it (rows_fx non-null), the call takes
// the rows kernels (batch below kLanesMinBatch or algo=rows), x is finite and every amax >= kFxMinAmax.
// Returns false (nothing done) otherwise: the caller runs the FMA walk.
template <class W, class RowsFx>
bool run_linear_fx(const W& w, const Problem& p, const I8Kernels& k, int algo, int64_t nnz, RowsFx rows_fx) {
  if (float_walk_forced_fma() || k.*rows_fx == nullptr || algo == 2 || (algo == 0 && p.B >= detail::kLanesMinBatch))
    return false;  // (the setting is read first: a bad value is an error on every ISA path)
  if (detail::any_nonfinite(p.x, p.B * p.in)) return false;
  if (p.B == 0 || p.out == 0) return true;
  FixedXBuffers buf;
  FixedX fx;
  if (!buf.fill(p, k, fx)) return false;
  detail::for_row_tasks(p, nnz, [&](int64_t r0, int64_t r1) { (k.*rows_fx)(w, fx, p, r0, r1); });
  return true;
}

// The reference of the fixed-point walk: x by the portable fixed_row, each row decoded to dense int8 and
// summed exactly; NaN / inf in x or a too small amax: the float32 reference.
template <class W>
void i8_linear_fx_ref(const W& wq, const Problem& p) {
  detail::check_problem(wq.w.rows, wq.w.cols, p);
  FixedXBuffers buf;
  FixedX fx;
  if (detail::any_nonfinite(p.x, p.B * p.in) || !buf.fill(p, scalar::i8, fx)) return i8_linear_ref(wq.w, wq.scales, p);
  int_rows_ref(
      wq, p,
      [&](int64_t b, int64_t j) {  // X[j] from its three limb bytes (two's complement, signed top byte)
        const uint8_t* l = fx.limbs + b * kFxLimbs * fx.ld;
        return int64_t{l[j]} + int64_t{l[fx.ld + j]} * 256 + int64_t{static_cast<int8_t>(l[2 * fx.ld + j])} * 65536;
      },
      [&](int64_t r, int64_t b, int64_t acc) { return fx_output(wq.scales[r], fx.scale[b], acc, p.bias ? p.bias[r] : 0.f); });
}

// The dispatched product of every format: I8Act::int8 where asked (rows_qx non-null), else the float32
// mode: the fixed-point walk where it applies (rows_fx non-null, run_linear_fx), else run_linear, then the
// NaN / inf fix-up.
template <class W, class F32, class RowsQx = std::nullptr_t, class RowsFx = std::nullptr_t>
void i8_linear(const W& w, const Problem& p, const I8Run<W, F32>& run, int algo, int64_t nnz, I8Act act,
               RowsQx rows_qx = nullptr, RowsFx rows_fx = nullptr) {
  detail::check_problem(w.w.rows, w.w.cols, p);
  if constexpr (!std::is_same_v<RowsQx, std::nullptr_t>) {
    if (act == I8Act::int8 && run_linear_qx(w, p, run.i8, algo, nnz, rows_qx)) return;
  } else {
    (void)act;
  }
  if constexpr (!std::is_same_v<RowsFx, std::nullptr_t>) {
    if (act == I8Act::f32 && run_linear_fx(w, p, run.i8, algo, nnz, rows_fx)) return;
  }
  detail::run_linear(w, p, run, algo, nnz);
  using View = std::decay_t<decltype(w.w)>;
  detail::fix_nonfinite(ColsDec<View>{w.w}, p);
}

}  // namespace

CsrI8 csr_i8_view(const Array& row_ptr, const Array& col, const Array& values, const Array& scales, int64_t cols,
                  const char* op, bool check_indices) {
  CsrI8 w;
  w.w = csr_view(row_ptr, col, as_f32(values, op), cols, op, check_indices);
  w.scales = checked_scales(scales, w.w.rows, op, check_indices);
  return w;
}

BitmapI8 bitmap_i8_view(const Array& bits, const Array& row_offsets, const Array& values, const Array& scales,
                        int64_t cols, const char* op, bool check_indices) {
  BitmapI8 w;
  w.w = bitmap_view(bits, row_offsets, as_f32(values, op), cols, op, check_indices);
  w.scales = checked_scales(scales, w.w.rows, op, check_indices);
  return w;
}

NmI8 nm_i8_view(const Array& values, const Array& indices, const Array& scales, int n, int m, int64_t cols,
                const char* op, bool check_indices) {
  NmI8 w;
  w.w = nm_view(as_f32(values, op), indices, n, m, cols, op, check_indices);
  w.scales = checked_scales(scales, w.w.rows, op, check_indices);
  return w;
}

int int8_rows_in_flight() {
  const char* env = std::getenv("SPARSEFORGE_INT8_ROWS");
  if (env == nullptr || *env == '\0') return 1;
  const std::string v = env;
  if (v == "1" || v == "2") return v[0] - '0';
  throw std::invalid_argument("SPARSEFORGE_INT8_ROWS='" + v + "' is not a setting; use 1 or 2");
}

const char* int8_act_path(Isa isa) {
  const I8Kernels& k = i8_kernels(isa);
#if defined(SF_HAVE_X86_KERNELS)
#if defined(SF_HAVE_INT8_VNNI_KERNELS)
  if (&k == &avx512vnni::i8) return "avx512_vnni";
#endif
#if defined(SF_HAVE_INT8_AVX_VNNI_KERNELS)
  if (&k == &avx2vnni::i8) return "avx2_vnni";
#endif
  if (&k == &avx512::i8 || &k == &avx2::i8) return "avx2";  // the avx512 table runs the AVX2 int8-activation kernels
#endif
  (void)k;
  return "portable";
}

const char* int8_float_walk(Isa isa, int n, int m) {
  const bool nm24 = n == 2 && m == 4;
  return !float_walk_forced_fma() && i8_kernels(isa).bitmap_rows_fx != nullptr && !nm24 ? "fixed_x" : "fma";
}

void bitmap_i8_linear_fx_ref(const BitmapI8& w, const Problem& p) { i8_linear_fx_ref(w, p); }

void nm_i8_linear_fx_ref(const NmI8& w, const Problem& p) { i8_linear_fx_ref(w, p); }

void bitmap_i8_linear_ref(const BitmapI8& w, const Problem& p) { i8_linear_ref(w.w, w.scales, p); }

void nm_i8_linear_ref(const NmI8& w, const Problem& p) { i8_linear_ref(w.w, w.scales, p); }

void csr_i8_linear_ref(const CsrI8& w, const Problem& p) { i8_linear_ref(w.w, w.scales, p); }

void bitmap_i8_linear_qx_ref(const BitmapI8& w, const Problem& p) { i8_linear_qx_ref(w, p); }

void nm_i8_linear_qx_ref(const NmI8& w, const Problem& p) { i8_linear_qx_ref(w, p); }

void csr_i8_linear(const CsrI8& w, const Problem& p, Isa isa, int algo) {
  i8_linear(w, p, I8Run<CsrI8, CsrKernels>{i8_kernels(isa), csr_kernels(isa), &I8Kernels::csr_rows}, algo, w.w.nnz,
            I8Act::f32);
}

void bitmap_i8_linear(const BitmapI8& w, const Problem& p, Isa isa, int algo, I8Act act) {
  i8_linear(w, p, I8Run<BitmapI8, BitmapKernels>{i8_kernels(isa), bitmap_kernels(isa), &I8Kernels::bitmap_rows}, algo,
            w.w.nnz, act, &I8Kernels::bitmap_rows_qx, &I8Kernels::bitmap_rows_fx);
}

void nm_i8_linear(const NmI8& w, const Problem& p, Isa isa, int algo, I8Act act) {
  const I8Run<NmI8, NmKernels> run{i8_kernels(isa), nm_kernels(isa), &I8Kernels::nm_rows};
  if (w.w.n == 2 && w.w.m == 4) {  // the FMA walk (int8_float_walk)
    i8_linear(w, p, run, algo, w.w.rows * w.w.vpr, act, &I8Kernels::nm_rows_qx);
  } else {
    i8_linear(w, p, run, algo, w.w.rows * w.w.vpr, act, &I8Kernels::nm_rows_qx, &I8Kernels::nm_rows_fx);
  }
}

}  // namespace sf
