// Bitmap kernels, AVX2 + FMA: each bitmap byte decodes 8 columns through a permutation table.
#include "bitmap.h"
#include "lanes.h"
#include "sddmm.h"
#include "simd_avx2.h"

namespace sf {
namespace avx2 {
namespace {

template <VT V, int NB>
void rows_nb(const BitmapView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
  const float* xs[NB];
  for (int nb = 0; nb < NB; ++nb) xs[nb] = p.x + (b0 + nb) * p.in;
  const int64_t cols = w.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.bits + r * w.bpr;
    int64_t vp = w.row_offsets[r];
    __m256 acc[NB][2];
    for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
      v256::prefetch(static_cast<const char*>(w.val) + vp * v256::val_bytes<V>(), v256::kPrefetchBytes);
      if ((c & 255) == 0) v256::prefetch(row + c / 8, v256::kPrefetchBytes);
      const unsigned m0 = row[c / 8], m1 = row[c / 8 + 1];
      const __m256 w0 = v256::expand8<V>(w.val, vp, m0, w.nnz);
      vp += __builtin_popcount(m0);
      const __m256 w1 = v256::expand8<V>(w.val, vp, m1, w.nnz);
      vp += __builtin_popcount(m1);
      for (int nb = 0; nb < NB; ++nb) {
        acc[nb][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[nb] + c), acc[nb][0]);
        acc[nb][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs[nb] + c + 8), acc[nb][1]);
      }
    }
    for (; c < cols; c += 8) {
      const int64_t nc = min64(8, cols - c);
      const unsigned m = row[c / 8] & ((1u << nc) - 1u);
      const __m256 w0 = v256::expand8<V>(w.val, vp, m, w.nnz);
      vp += __builtin_popcount(m);
      for (int nb = 0; nb < NB; ++nb) {
        acc[nb][0] = _mm256_fmadd_ps(w0, _mm256_maskload_ps(xs[nb] + c, v256::first_lanes(nc)), acc[nb][0]);
      }
    }
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int nb = 0; nb < NB; ++nb) p.y[(b0 + nb) * p.out + r] = v256::hsum(_mm256_add_ps(acc[nb][0], acc[nb][1])) + bv;
  }
}

template <VT V>
void rows_v(const BitmapView& w, const Problem& p, int64_t r0, int64_t r1) {
  for (int64_t b0 = 0; b0 < p.B; b0 += 4) {
    switch (min64(4, p.B - b0)) {
      case 1: rows_nb<V, 1>(w, p, r0, r1, b0); break;
      case 2: rows_nb<V, 2>(w, p, r0, r1, b0); break;
      case 3: rows_nb<V, 3>(w, p, r0, r1, b0); break;
      default: rows_nb<V, 4>(w, p, r0, r1, b0); break;
    }
  }
}

void rows(const BitmapView& w, const Problem& p, int64_t r0, int64_t r1) {
  if (w.vt == VT::f32) rows_v<VT::f32>(w, p, r0, r1); else rows_v<VT::bf16>(w, p, r0, r1);
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

}  // namespace avx2
}  // namespace sf
