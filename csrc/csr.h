// CSR (compressed sparse row) weights: y = x @ W^T (+ bias) and dx = dy @ W.
//
// Layout (what sparseforge.formats.csr.CSRWeight stores):
//   row_ptr  int32  (rows + 1,)  row r's entries are [row_ptr[r], row_ptr[r+1])
//   col      uint16 (nnz,) when cols <= 65536, else int32; ascending within a row
//   values   float32 or bfloat16 (nnz,)
#pragma once

#include "common.h"

namespace sf {

struct CsrView {
  int64_t rows = 0, cols = 0, nnz = 0;
  const int32_t* row_ptr = nullptr;
  const void* col = nullptr;
  bool col_u16 = true;
  const void* val = nullptr;
  VT vt = VT::f32;
};

struct CsrKernels {
  void (*rows)(const CsrView&, const Problem&, int64_t r0, int64_t r1);
  void (*lanes)(const CsrView&, const Problem&, const LanesPlan&, int64_t r0, int64_t r1, float* ybuf);
  void (*lanes_t)(const CsrView&, const ProblemT&, const LanesPlan&, int64_t r0, int64_t r1, float* dxt);
  // dW at the mask for rows [r0, r1) (sddmm.h); xp / dp: x and dy in lanes tiles
  void (*sddmm)(const CsrView&, const ProblemW&, const LanesPlan& xp, const LanesPlan& dp, int64_t r0, int64_t r1);
};

namespace scalar { extern const CsrKernels csr; }
namespace avx2 { extern const CsrKernels csr; }
namespace avx512 { extern const CsrKernels csr; }
// the kernel table of path `isa`
const CsrKernels& csr_kernels(Isa isa);

// Plain single-threaded oracles: every row decoded to a dense row (zeros where pruned), then a
// dense dot product in column order, so NaN/inf behave exactly as in a dense matmul.
void csr_linear_ref(const CsrView& w, const Problem& p);
void csr_linear_t_ref(const CsrView& w, const ProblemT& p);
// Dispatched, multithreaded kernels. algo: 0 auto, 1 rows (row streaming), 2 lanes (batch in SIMD lanes).
void csr_linear(const CsrView& w, const Problem& p, Isa isa, int algo);
void csr_linear_t(const CsrView& w, const ProblemT& p, Isa isa);
// dW restricted to the mask: dw (nnz,) in values order (see ProblemW); reference and dispatched.
void csr_sddmm_ref(const CsrView& w, const ProblemW& p);
void csr_sddmm(const CsrView& w, const ProblemW& p, Isa isa);

namespace {

// Walks the stored entries of one row in column order; run() stops at the first column >= cend.
template <class I, VT V>
struct CsrDec {
  using Index = I;
  static constexpr VT kVT = V;
  const int32_t* rp;
  const I* col;
  const void* val;
  int64_t cols;
  struct Cur {
    int64_t p, end;
  };
  explicit CsrDec(const CsrView& w)
      : rp(w.row_ptr), col(static_cast<const I*>(w.col)), val(w.val), cols(w.cols) {}
  Cur begin(int64_t r) const { return {rp[r], rp[r + 1]}; }
  template <class F>
  void run(Cur& c, int64_t cend, F&& f) const {
    int64_t q = c.p;  // find the end first: a counted loop keeps the caller's sums in registers
    while (q < c.end && static_cast<int64_t>(col[q]) < cend) ++q;
    for (int64_t p = c.p; p < q; ++p) f(static_cast<int64_t>(col[p]), load_val<V>(val, p));
    c.p = q;
  }
};

// f(column, value index) for each stored entry of row r, written independently of CsrDec (the
// scalar references use it)
template <class F>
void csr_stored(const CsrView& w, int64_t r, F&& f) {
  for (int64_t q = w.row_ptr[r]; q < w.row_ptr[r + 1]; ++q)
    f(w.col_u16 ? int64_t{static_cast<const uint16_t*>(w.col)[q]} : int64_t{static_cast<const int32_t*>(w.col)[q]}, q);
}

}  // namespace
}  // namespace sf
