// BSR: scalar reference (test oracle), portable scalar kernels, dispatch.
#include "bsr.h"

#include "bsr_kernels.h"
#include "driver.h"

namespace sf {

namespace scalar {
extern const BsrKernels bsr = {bsr_rows, bsr_lanes, bsr_lanes_t, bsr_sddmm};
}  // namespace scalar

namespace {

// f(column, value index) for each stored entry of row r, block by block (independent of BsrDec)
template <class F>
void stored(const BsrView& w, int64_t r, F&& f) {
  const int64_t R = r / w.h, i = r % w.h;
  for (int64_t b = w.brp[R]; b < w.brp[R + 1]; ++b)
    for (int64_t jj = 0; jj < w.w; ++jj) f(w.block_col(b) * w.w + jj, (b * w.h + i) * w.w + jj);
}

void dense_row(const BsrView& w, int64_t r, float* row) {
  for (int64_t j = 0; j < w.cols; ++j) row[j] = 0.f;
  stored(w, r, [&](int64_t j, int64_t q) {
    row[j] = w.vt == VT::f32 ? load_val<VT::f32>(w.val, q) : load_val<VT::bf16>(w.val, q);
  });
}

const BsrKernels& kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return avx512::bsr;
  if (isa == Isa::avx2) return avx2::bsr;
#endif
  (void)isa;
  return scalar::bsr;
}

}  // namespace

void bsr_linear_ref(const BsrView& w, const Problem& p) { detail::linear_ref(w, p, dense_row); }

void bsr_linear_t_ref(const BsrView& w, const ProblemT& p) { detail::linear_t_ref(w, p, dense_row); }

void bsr_sddmm_ref(const BsrView& w, const ProblemW& p) {
  detail::sddmm_ref(w, p, [](const BsrView& v, int64_t r, auto&& f) { stored(v, r, f); });
}

void bsr_linear(const BsrView& w, const Problem& p, Isa isa, int algo) {
  detail::check_problem(w.rows, w.cols, p);
  detail::run_linear(w, p, kernels(isa), algo, w.nblocks * w.h * w.w);
  with_bsr_dec(w, [&](const auto& dec) { detail::fix_nonfinite(dec, p); });
}

void bsr_linear_t(const BsrView& w, const ProblemT& p, Isa isa) {
  detail::check_problem_t(w.rows, w.cols, p);
  detail::run_linear_t(w, p, kernels(isa), w.nblocks * w.h * w.w);
  with_bsr_dec(w, [&](const auto& dec) { detail::fix_nonfinite_t(dec, p); });
}

void bsr_sddmm(const BsrView& w, const ProblemW& p, Isa isa) {
  detail::run_sddmm(w, p, kernels(isa), w.nblocks * w.h * w.w);
}

}  // namespace sf
