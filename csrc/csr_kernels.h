// CSR kernels, written once and compiled per instruction set (like bsr_kernels.h): csr.cpp
// (portable, SSE), csr_avx2.cpp and csr_avx512.cpp each include this header and export its table.
// Everything has internal linkage.
//
// rows (batch 1-3, or algo=rows): per output row, x is gathered at the column indices while the
//   values stream, for up to 4 batch rows at once (AVX-512: vpgatherdd; AVX2: vgatherdps, 8 entries
//   at a time; portable: the decoder's scalar loop).
// lanes / lanes_t / sddmm: the generic batch-in-lanes kernels (lanes.h, sddmm.h) over CsrDec; the
//   AVX-512 lanes decoder adds a vectorised collect.
#pragma once

#include "csr.h"
#include "lanes.h"
#include "sddmm.h"
#if defined(__AVX512F__)
#include "simd_avx512.h"
#elif defined(__AVX2__)
#include "simd_avx2.h"
#endif

namespace sf {
namespace {

#if defined(__AVX512F__)
template <class I, VT V, int NB>
void csr_rows_nb(const CsrView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
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

// CsrDec plus a vectorised collect for the lanes kernels: 16 column indices at a time are widened
// into the entry list and compared with the tile end (columns ascend within a row).
template <class I, VT V>
struct CsrLanesDec : CsrDec<I, V> {
  using Base = CsrDec<I, V>;
  using typename Base::Cur;
  explicit CsrLanesDec(const CsrView& w) : Base(w) {}
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
#elif defined(__AVX2__)
template <class I, VT V, int NB>
void csr_rows_nb(const CsrView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
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
#endif

#if !defined(__AVX512F__)
template <class I, VT V>
using CsrLanesDec = CsrDec<I, V>;
#endif

// body(Dec<I, V>(w)) with the index / value types of w
template <template <class, VT> class Dec, class Body>
void with_csr(const CsrView& w, Body&& body) {
  if (w.col_u16) {
    if (w.vt == VT::f32) body(Dec<uint16_t, VT::f32>(w)); else body(Dec<uint16_t, VT::bf16>(w));
  } else {
    if (w.vt == VT::f32) body(Dec<int32_t, VT::f32>(w)); else body(Dec<int32_t, VT::bf16>(w));
  }
}

void csr_rows(const CsrView& w, const Problem& p, int64_t r0, int64_t r1) {
  with_csr<CsrDec>(w, [&](const auto& dec) {
#if defined(__AVX2__)
    using Dec = std::decay_t<decltype(dec)>;
    for_batch_quads(p.B, [&](auto nb, int64_t b0) {
      csr_rows_nb<typename Dec::Index, Dec::kVT, decltype(nb)::value>(w, p, r0, r1, b0);
    });
#else
    rows_dec(dec, p, r0, r1);
#endif
  });
}

// the decoders of the generic kernels (sddmm.h: DecoderKernels)
struct CsrFormat {
  using View = CsrView;
  template <class Body> static void lanes_dec(const CsrView& w, Body&& body) { with_csr<CsrLanesDec>(w, body); }
  template <class Body> static void dec(const CsrView& w, Body&& body) { with_csr<CsrDec>(w, body); }
  static int64_t first(const CsrView& w, int64_t r) { return w.row_ptr[r]; }
};

// this file's kernel table (csr.h: scalar::csr, avx2::csr, avx512::csr)
using CsrGeneric = DecoderKernels<CsrFormat>;
constexpr CsrKernels kCsrKernels = {csr_rows, CsrGeneric::lanes, CsrGeneric::lanes_t, CsrGeneric::sddmm};

}  // namespace
}  // namespace sf
