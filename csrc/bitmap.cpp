// Bitmap: scalar reference (test oracle), portable kernels (bitmap_kernels.h at SSE width), dispatch.
#include "bitmap.h"

#include "bitmap_kernels.h"
#include "driver.h"
#if defined(SF_HAVE_BF16_KERNELS)
#include "bitmap_bf16dot.h"
#endif

namespace sf {

namespace scalar {
extern const BitmapKernels bitmap = kBitmapKernels;
}  // namespace scalar

namespace {

// the dense row r of W
void dense_row(const BitmapView& w, int64_t r, float* row) {
  for (int64_t j = 0; j < w.cols; ++j) row[j] = 0.f;
  bitmap_stored(w, r, [&](int64_t j, int64_t q) {
    row[j] = w.vt == VT::f32 ? load_val<VT::f32>(w.val, q) : load_val<VT::bf16>(w.val, q);
  });
}

}  // namespace

const BitmapKernels& bitmap_kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return use_vpopcntdq() ? avx512vp::bitmap : avx512::bitmap;
  if (isa == Isa::avx2) return avx2::bitmap;
#endif
  (void)isa;
  return scalar::bitmap;
}

void bitmap_linear_ref(const BitmapView& w, const Problem& p) { detail::linear_ref(w, p, dense_row); }

void bitmap_linear_t_ref(const BitmapView& w, const ProblemT& p) { detail::linear_t_ref(w, p, dense_row); }

void bitmap_sddmm_ref(const BitmapView& w, const ProblemW& p) {
  detail::sddmm_ref(w, p, [](const BitmapView& v, int64_t r, auto&& f) { bitmap_stored(v, r, f); });
}

void bitmap_sddmm(const BitmapView& w, const ProblemW& p, Isa isa) { detail::run_sddmm(w, p, bitmap_kernels(isa), w.nnz); }

namespace {

// batch 1 with bf16 values on AVX512_BF16 + VBMI2: the vdpbf16ps walk (bitmap_bf16dot.h), unless x is not finite
bool bf16dot_done(const BitmapView& w, const Problem& p, Isa isa, int algo) {
#if defined(SF_HAVE_BF16_KERNELS)
  return isa == Isa::avx512 && algo != 2 && w.vt == VT::bf16 && p.B == 1 && bitmap_bf16dot_linear(w, p);
#else
  (void)w, (void)p, (void)isa, (void)algo;
  return false;
#endif
}

}  // namespace

void bitmap_linear(const BitmapView& w, const Problem& p, Isa isa, int algo) {
  detail::check_problem(w.rows, w.cols, p);
  if (!bf16dot_done(w, p, isa, algo)) detail::run_linear(w, p, bitmap_kernels(isa), algo, w.nnz);
  with_bitmap<BitmapDec>(w, [&](const auto& dec) { detail::fix_nonfinite(dec, p); });
}

void bitmap_linear_t(const BitmapView& w, const ProblemT& p, Isa isa) {
  detail::check_problem_t(w.rows, w.cols, p);
  detail::run_linear_t(w, p, bitmap_kernels(isa), w.nnz);
  with_bitmap<BitmapDec>(w, [&](const auto& dec) { detail::fix_nonfinite_t(dec, p); });
}

}  // namespace sf
