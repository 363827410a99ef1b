// CSR: scalar reference (test oracle), portable scalar kernels, dispatch.
#include "csr.h"

#include "driver.h"

namespace sf {

namespace scalar {
namespace {
void rows(const CsrView& w, const Problem& p, int64_t r0, int64_t r1) {
  with_csr_dec(w, [&](const auto& dec) { detail::rows_scalar(dec, p, r0, r1); });
}
void lanes(const CsrView& w, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) {
  with_csr_dec(w, [&](const auto& dec) { lanes_rows(dec, p, lp, r0, r1, ybuf); });
}
void lanes_t(const CsrView& w, const ProblemT& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* dxt) {
  with_csr_dec(w, [&](const auto& dec) { lanes_t_rows(dec, p, lp, r0, r1, dxt); });
}
}  // namespace
extern const CsrKernels csr = {rows, lanes, lanes_t};
}  // namespace scalar

namespace {

// the dense row r of W (zeros where nothing is stored), written independently of CsrDec
void dense_row(const CsrView& w, int64_t r, float* row) {
  for (int64_t j = 0; j < w.cols; ++j) row[j] = 0.f;
  for (int64_t q = w.row_ptr[r]; q < w.row_ptr[r + 1]; ++q) {
    const int64_t j = w.col_u16 ? static_cast<const uint16_t*>(w.col)[q] : static_cast<const int32_t*>(w.col)[q];
    row[j] = w.vt == VT::f32 ? load_val<VT::f32>(w.val, q) : load_val<VT::bf16>(w.val, q);
  }
}

const CsrKernels& kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return avx512::csr;
  if (isa == Isa::avx2) return avx2::csr;
#endif
  (void)isa;
  return scalar::csr;
}

}  // namespace

void csr_linear_ref(const CsrView& w, const Problem& p) { detail::linear_ref(w, p, dense_row); }

void csr_linear_t_ref(const CsrView& w, const ProblemT& p) { detail::linear_t_ref(w, p, dense_row); }

void csr_linear(const CsrView& w, const Problem& p, Isa isa, int algo) {
  detail::check_problem(w.rows, w.cols, p);
  detail::run_linear(w, p, kernels(isa), algo, w.nnz);
  with_csr_dec(w, [&](const auto& dec) { detail::fix_nonfinite(dec, p); });
}

void csr_linear_t(const CsrView& w, const ProblemT& p, Isa isa) {
  detail::check_problem_t(w.rows, w.cols, p);
  detail::run_linear_t(w, p, kernels(isa), w.nnz);
  with_csr_dec(w, [&](const auto& dec) { detail::fix_nonfinite_t(dec, p); });
}

}  // namespace sf
