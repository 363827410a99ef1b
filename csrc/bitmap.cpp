// Bitmap: scalar reference (test oracle), portable scalar kernels, dispatch.
#include "bitmap.h"

#include "driver.h"
#include "sddmm.h"

namespace sf {

namespace scalar {
namespace {
void rows(const BitmapView& w, const Problem& p, int64_t r0, int64_t r1) {
  with_bitmap_dec(w, [&](const auto& dec) { detail::rows_scalar(dec, p, r0, r1); });
}
void lanes(const BitmapView& w, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) {
  with_bitmap_dec(w, [&](const auto& dec) { lanes_rows(dec, p, lp, r0, r1, ybuf); });
}
void lanes_t(const BitmapView& w, const ProblemT& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* dxt) {
  with_bitmap_dec(w, [&](const auto& dec) { lanes_t_rows(dec, p, lp, r0, r1, dxt); });
}
void sddmm(const BitmapView& w, const ProblemW& p, const LanesPlan& xp, const LanesPlan& dp, int64_t r0, int64_t r1) {
  with_bitmap_dec(w, [&](const auto& dec) {
    sddmm_rows(dec, [&](int64_t r) -> int64_t { return w.row_offsets[r]; }, p, xp, dp, r0, r1);
  });
}
}  // namespace
extern const BitmapKernels bitmap = {rows, lanes, lanes_t, sddmm};
}  // namespace scalar

namespace {

// f(column, value index) for each stored entry of row r, bit by bit (independent of BitmapDec)
template <class F>
void stored(const BitmapView& w, int64_t r, F&& f) {
  int64_t vp = w.row_offsets[r];
  for (int64_t j = 0; j < w.cols; ++j)
    if ((w.bits[r * w.bpr + j / 8] >> (j % 8)) & 1) f(j, vp++);
}

// the dense row r of W
void dense_row(const BitmapView& w, int64_t r, float* row) {
  for (int64_t j = 0; j < w.cols; ++j) row[j] = 0.f;
  stored(w, r, [&](int64_t j, int64_t q) {
    row[j] = w.vt == VT::f32 ? load_val<VT::f32>(w.val, q) : load_val<VT::bf16>(w.val, q);
  });
}

const BitmapKernels& kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return use_vpopcntdq() ? avx512vp::bitmap : avx512::bitmap;
  if (isa == Isa::avx2) return avx2::bitmap;
#endif
  (void)isa;
  return scalar::bitmap;
}

}  // namespace

void bitmap_linear_ref(const BitmapView& w, const Problem& p) { detail::linear_ref(w, p, dense_row); }

void bitmap_linear_t_ref(const BitmapView& w, const ProblemT& p) { detail::linear_t_ref(w, p, dense_row); }

void bitmap_sddmm_ref(const BitmapView& w, const ProblemW& p) {
  detail::sddmm_ref(w, p, [](const BitmapView& v, int64_t r, auto&& f) { stored(v, r, f); });
}

void bitmap_sddmm(const BitmapView& w, const ProblemW& p, Isa isa) { detail::run_sddmm(w, p, kernels(isa), w.nnz); }

void bitmap_linear(const BitmapView& w, const Problem& p, Isa isa, int algo) {
  detail::check_problem(w.rows, w.cols, p);
  detail::run_linear(w, p, kernels(isa), algo, w.nnz);
  with_bitmap_dec(w, [&](const auto& dec) { detail::fix_nonfinite(dec, p); });
}

void bitmap_linear_t(const BitmapView& w, const ProblemT& p, Isa isa) {
  detail::check_problem_t(w.rows, w.cols, p);
  detail::run_linear_t(w, p, kernels(isa), w.nnz);
  with_bitmap_dec(w, [&](const auto& dec) { detail::fix_nonfinite_t(dec, p); });
}

}  // namespace sf
