// CSR: scalar reference (test oracle), portable kernels (csr_kernels.h at SSE width), dispatch.
#include "csr.h"

#include "csr_kernels.h"
#include "driver.h"

namespace sf {

namespace scalar {
extern const CsrKernels csr = kCsrKernels;
}  // namespace scalar

namespace {

// the dense row r of W (zeros where nothing is stored)
void dense_row(const CsrView& w, int64_t r, float* row) {
  for (int64_t j = 0; j < w.cols; ++j) row[j] = 0.f;
  csr_stored(w, r, [&](int64_t j, int64_t q) {
    row[j] = w.vt == VT::f32 ? load_val<VT::f32>(w.val, q) : load_val<VT::bf16>(w.val, q);
  });
}

}  // namespace

const CsrKernels& csr_kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return avx512::csr;
  if (isa == Isa::avx2) return avx2::csr;
#endif
  (void)isa;
  return scalar::csr;
}


void csr_linear_ref(const CsrView& w, const Problem& p) { detail::linear_ref(w, p, dense_row); }

void csr_linear_t_ref(const CsrView& w, const ProblemT& p) { detail::linear_t_ref(w, p, dense_row); }

void csr_sddmm_ref(const CsrView& w, const ProblemW& p) {
  detail::sddmm_ref(w, p, [](const CsrView& v, int64_t r, auto&& f) { csr_stored(v, r, f); });
}

void csr_sddmm(const CsrView& w, const ProblemW& p, Isa isa) { detail::run_sddmm(w, p, csr_kernels(isa), w.nnz); }

void csr_linear(const CsrView& w, const Problem& p, Isa isa, int algo) {
  detail::check_problem(w.rows, w.cols, p);
  detail::run_linear(w, p, csr_kernels(isa), algo, w.nnz);
  with_csr<CsrDec>(w, [&](const auto& dec) { detail::fix_nonfinite(dec, p); });
}

void csr_linear_t(const CsrView& w, const ProblemT& p, Isa isa) {
  detail::check_problem_t(w.rows, w.cols, p);
  detail::run_linear_t(w, p, csr_kernels(isa), w.nnz);
  with_csr<CsrDec>(w, [&](const auto& dec) { detail::fix_nonfinite_t(dec, p); });
}

}  // namespace sf
