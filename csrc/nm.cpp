// N:M: scalar reference (test oracle), portable scalar kernels, dispatch.
#include "nm.h"

#include "driver.h"

namespace sf {

namespace scalar {
namespace {
void rows(const NmView& w, const Problem& p, int64_t r0, int64_t r1) {
  with_nm_dec(w, [&](const auto& dec) { detail::rows_scalar(dec, p, r0, r1); });
}
void lanes(const NmView& w, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) {
  with_nm_dec(w, [&](const auto& dec) { lanes_rows(dec, p, lp, r0, r1, ybuf); });
}
void lanes_t(const NmView& w, const ProblemT& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* dxt) {
  with_nm_dec(w, [&](const auto& dec) { lanes_t_rows(dec, p, lp, r0, r1, dxt); });
}
}  // namespace
extern const NmKernels nm = {rows, lanes, lanes_t};
}  // namespace scalar

namespace {

// the dense row r of W, reading the index stream one bit at a time (independent of NmDec)
void dense_row(const NmView& w, int64_t r, float* row) {
  for (int64_t j = 0; j < w.cols; ++j) row[j] = 0.f;
  const uint8_t* irow = w.idx + r * w.ibpr;
  for (int64_t v = 0; v < w.vpr; ++v) {
    int pos = 0;
    for (int t = 0; t < w.b; ++t) {
      const int64_t bit = v * w.b + t;
      pos |= ((irow[bit / 8] >> (bit % 8)) & 1) << t;
    }
    const int64_t q = r * w.vpr + v;
    row[(v / w.n) * w.m + pos] = w.vt == VT::f32 ? load_val<VT::f32>(w.val, q) : load_val<VT::bf16>(w.val, q);
  }
}

const NmKernels& kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return avx512::nm;
  if (isa == Isa::avx2) return avx2::nm;
#endif
  (void)isa;
  return scalar::nm;
}

}  // namespace

void nm_linear_ref(const NmView& w, const Problem& p) { detail::linear_ref(w, p, dense_row); }

void nm_linear_t_ref(const NmView& w, const ProblemT& p) { detail::linear_t_ref(w, p, dense_row); }

void nm_linear(const NmView& w, const Problem& p, Isa isa, int algo) {
  detail::check_problem(w.rows, w.cols, p);
  detail::run_linear(w, p, kernels(isa), algo, w.rows * w.vpr);
  with_nm_dec(w, [&](const auto& dec) { detail::fix_nonfinite(dec, p); });
}

void nm_linear_t(const NmView& w, const ProblemT& p, Isa isa) {
  detail::check_problem_t(w.rows, w.cols, p);
  detail::run_linear_t(w, p, kernels(isa), w.rows * w.vpr);
  with_nm_dec(w, [&](const auto& dec) { detail::fix_nonfinite_t(dec, p); });
}

}  // namespace sf
