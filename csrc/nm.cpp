// N:M: scalar reference (test oracle), portable kernels (nm_kernels.h at SSE width), dispatch.
#include "nm.h"

#include "driver.h"
#include "nm_kernels.h"

namespace sf {

namespace scalar {
extern const NmKernels nm = kNmKernels;
}  // namespace scalar

namespace {

// the dense row r of W
void dense_row(const NmView& w, int64_t r, float* row) {
  for (int64_t j = 0; j < w.cols; ++j) row[j] = 0.f;
  nm_stored(w, r, [&](int64_t j, int64_t q) {
    row[j] = w.vt == VT::f32 ? load_val<VT::f32>(w.val, q) : load_val<VT::bf16>(w.val, q);
  });
}

}  // namespace

const NmKernels& nm_kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return use_vpopcntdq() ? avx512vp::nm : avx512::nm;
  if (isa == Isa::avx2) return avx2::nm;
#endif
  (void)isa;
  return scalar::nm;
}

void nm_linear_ref(const NmView& w, const Problem& p) { detail::linear_ref(w, p, dense_row); }

void nm_linear_t_ref(const NmView& w, const ProblemT& p) { detail::linear_t_ref(w, p, dense_row); }

void nm_sddmm_ref(const NmView& w, const ProblemW& p) {
  detail::sddmm_ref(w, p, [](const NmView& v, int64_t r, auto&& f) { nm_stored(v, r, f); });
}

void nm_sddmm(const NmView& w, const ProblemW& p, Isa isa) { detail::run_sddmm(w, p, nm_kernels(isa), w.rows * w.vpr); }

void nm_linear(const NmView& w, const Problem& p, Isa isa, int algo) {
  detail::check_problem(w.rows, w.cols, p);
  detail::run_linear(w, p, nm_kernels(isa), algo, w.rows * w.vpr);
  with_nm<NmDec>(w, [&](const auto& dec) { detail::fix_nonfinite(dec, p); });
}

void nm_linear_t(const NmView& w, const ProblemT& p, Isa isa) {
  detail::check_problem_t(w.rows, w.cols, p);
  detail::run_linear_t(w, p, nm_kernels(isa), w.rows * w.vpr);
  with_nm<NmDec>(w, [&](const auto& dec) { detail::fix_nonfinite_t(dec, p); });
}

}  // namespace sf
