// CSR kernels, AVX2 + FMA: rows gathers x with vgatherdps, 8 entries at a time.
#include "csr.h"
#include "lanes.h"
#include "sddmm.h"
#include "simd_avx2.h"

namespace sf {
namespace avx2 {
namespace {

template <class I, VT V, int NB>
void rows_nb(const CsrView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
  const I* col = static_cast<const I*>(w.col);
  const float* xs[NB];
  for (int nb = 0; nb < NB; ++nb) xs[nb] = p.x + (b0 + nb) * p.in;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t q0 = w.row_ptr[r], q1 = w.row_ptr[r + 1];
    __m256 a0[NB], a1[NB];
    float tail[NB];
    for (int nb = 0; nb < NB; ++nb) {
      a0[nb] = a1[nb] = _mm256_setzero_ps();
      tail[nb] = 0.f;
    }
    v256::gather_dot<I, V, NB>(col + q0, w.val, q0, q1 - q0, xs, a0, a1, tail);
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int nb = 0; nb < NB; ++nb) p.y[(b0 + nb) * p.out + r] = v256::hsum(_mm256_add_ps(a0[nb], a1[nb])) + tail[nb] + bv;
  }
}

template <class I, VT V>
void rows_iv(const CsrView& w, const Problem& p, int64_t r0, int64_t r1) {
  for (int64_t b0 = 0; b0 < p.B; b0 += 4) {
    switch (min64(4, p.B - b0)) {
      case 1: rows_nb<I, V, 1>(w, p, r0, r1, b0); break;
      case 2: rows_nb<I, V, 2>(w, p, r0, r1, b0); break;
      case 3: rows_nb<I, V, 3>(w, p, r0, r1, b0); break;
      default: rows_nb<I, V, 4>(w, p, r0, r1, b0); break;
    }
  }
}

void rows(const CsrView& w, const Problem& p, int64_t r0, int64_t r1) {
  if (w.col_u16) {
    if (w.vt == VT::f32) rows_iv<uint16_t, VT::f32>(w, p, r0, r1); else rows_iv<uint16_t, VT::bf16>(w, p, r0, r1);
  } else {
    if (w.vt == VT::f32) rows_iv<int32_t, VT::f32>(w, p, r0, r1); else rows_iv<int32_t, VT::bf16>(w, p, r0, r1);
  }
}

void lanes(const CsrView& w, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) {
  with_csr_dec(w, [&](const auto& dec) { lanes_rows(dec, p, lp, r0, r1, ybuf); });
}

void lanes_t(const CsrView& w, const ProblemT& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* dxt) {
  with_csr_dec(w, [&](const auto& dec) { lanes_t_rows(dec, p, lp, r0, r1, dxt); });
}

void sddmm(const CsrView& w, const ProblemW& p, const LanesPlan& xp, const LanesPlan& dp, int64_t r0, int64_t r1) {
  with_csr_dec(w, [&](const auto& dec) {
    sddmm_rows(dec, [&](int64_t r) -> int64_t { return w.row_ptr[r]; }, p, xp, dp, r0, r1);
  });
}

}  // namespace

extern const CsrKernels csr = {rows, lanes, lanes_t, sddmm};

}  // namespace avx2
}  // namespace sf
