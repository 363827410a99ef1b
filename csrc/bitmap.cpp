// Bitmap: scalar reference (test oracle), portable kernels (bitmap_kernels.h at SSE width), dispatch.
#include "bitmap.h"

#include "bitmap_kernels.h"
#include "driver.h"
#if defined(SF_HAVE_BF16_KERNELS)
#include <vector>

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

#if defined(SF_HAVE_BF16_KERNELS)
// x (n,) float32 -> its bf16 bits (zero up to `stride`); false where an element is not a bf16 value
// (its low 16 bits are set) or is a NaN or infinity: the FMA walk takes those.
bool bf16_of(const float* x, int64_t n, int64_t stride, uint16_t* xb) {
  uint32_t low = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    if ((b & 0x7f800000u) == 0x7f800000u) return false;
    low |= b & 0xffffu;
    xb[i] = static_cast<uint16_t>(b >> 16);
  }
  std::memset(xb + n, 0, static_cast<size_t>(stride - n) * 2);
  return low == 0;
}
#endif

// batch 1 with bf16 values on AVX512_BF16 + VBMI2: the vdpbf16ps walk (bitmap_bf16dot.h), unless
// an element of x is not a finite bf16 value
bool bf16dot_done(const BitmapView& w, const Problem& p, Isa isa, int algo) {
#if defined(SF_HAVE_BF16_KERNELS)
  if (isa != Isa::avx512 || algo == 2 || w.vt != VT::bf16 || p.B != 1 || !bitmap_bf16dot_available()) return false;
  const int64_t stride = (w.cols + 31) / 32 * 32;  // every 32-column step loads inside the plane
  thread_local std::vector<uint16_t> xb;
  xb.resize(static_cast<size_t>(stride));
  if (!bf16_of(p.x, w.cols, stride, xb.data())) return false;
  const uint16_t* xs = xb.data();
  detail::for_row_tasks(p, w.nnz, [&](int64_t r0, int64_t r1) { bitmap_bf16dot_rows(w, xs, p.bias, p.y, r0, r1); });
  return true;
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
