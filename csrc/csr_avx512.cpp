// CSR kernels, AVX-512 (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq).
// rows: per output row, gather x at the column indices (vpgatherdd) and stream the values.
#include "csr.h"
#include "lanes.h"
#include "sddmm.h"
#include "simd_avx512.h"

namespace sf {
namespace avx512 {
namespace {

template <class I, VT V, int NB>
void rows_nb(const CsrView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
  const I* col = static_cast<const I*>(w.col);
  const float* xs[NB];
  for (int nb = 0; nb < NB; ++nb) xs[nb] = p.x + (b0 + nb) * p.in;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t q0 = w.row_ptr[r], q1 = w.row_ptr[r + 1];
    __m512 a0[NB], a1[NB];
    for (int nb = 0; nb < NB; ++nb) a0[nb] = a1[nb] = _mm512_setzero_ps();
    v512::gather_dot<I, V, NB>(col + q0, w.val, q0, q1 - q0, xs, a0, a1);
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int nb = 0; nb < NB; ++nb) p.y[(b0 + nb) * p.out + r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[nb], a1[nb])) + bv;
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

// CsrDec plus a vectorised collect for the lanes kernels: 16 column indices at a time are widened
// into the entry list and compared with the tile end (columns ascend within a row).
template <class I, VT V>
struct LanesDec : CsrDec<I, V> {
  using Base = CsrDec<I, V>;
  using typename Base::Cur;
  explicit LanesDec(const CsrView& w) : Base(w) {}
  static constexpr VT kValues = V;  // the lanes FMA loop widens bf16 values itself
  int64_t collect(Cur& c, int64_t cend, int32_t* idx, const void** vals) const {
    const __m512i lim = _mm512_set1_epi32(static_cast<int32_t>(cend < 0x7fffffff ? cend : 0x7fffffff));
    const int64_t avail = c.end - c.p;
    const I* col = this->col + c.p;
    int64_t n = 0;
    for (;;) {  // n advances by 16 until a chunk ends the tile: no dependency on the loaded data
      if (n + 16 <= avail) {
        const __m512i cols = v512::idx16(col + n);
        _mm512_storeu_si512(idx + n, cols);
        const __mmask16 in = _mm512_cmplt_epi32_mask(cols, lim);
        if (in != 0xFFFF) {
          n += __builtin_popcount(in);
          break;
        }
        n += 16;
      } else {
        if (n < avail) {
          const __mmask16 k = v512::first_lanes(avail - n);
          const __m512i cols = v512::idx16(col + n, k);
          _mm512_storeu_si512(idx + n, cols);
          n += __builtin_popcount(_mm512_mask_cmplt_epi32_mask(k, cols, lim));
        }
        break;
      }
    }
    *vals = static_cast<const char*>(this->val) + (c.p) * v512::val_bytes<V>();
    c.p += n;
    // the next tile holds about as many entries (prefetches past the end of a buffer never fault)
    v512::prefetch_ahead<v512::kAheadEntries * static_cast<int64_t>(sizeof(I))>(this->col + c.p);
    v512::prefetch_ahead<v512::kAheadEntries * v512::val_bytes<V>()>(static_cast<const char*>(this->val) + c.p * v512::val_bytes<V>());
    return n;
  }
};

void lanes(const CsrView& w, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) {
  if (w.col_u16) {
    if (w.vt == VT::f32) lanes_rows(LanesDec<uint16_t, VT::f32>(w), p, lp, r0, r1, ybuf);
    else lanes_rows(LanesDec<uint16_t, VT::bf16>(w), p, lp, r0, r1, ybuf);
  } else {
    if (w.vt == VT::f32) lanes_rows(LanesDec<int32_t, VT::f32>(w), p, lp, r0, r1, ybuf);
    else lanes_rows(LanesDec<int32_t, VT::bf16>(w), p, lp, r0, r1, ybuf);
  }
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

}  // namespace avx512
}  // namespace sf
