// N:M kernels, written once and compiled per instruction set (like bsr_kernels.h): nm.cpp
// (portable, SSE), nm_avx2.cpp, nm_avx512.cpp and nm_avx512vp.cpp (AVX-512 with
// AVX512_VPOPCNTDQ) each include this header and export its table. Everything has internal linkage.
//
// rows (batch 1-3, or algo=rows):
//   2:4: the index bytes are the groups' keep-masks (kNm24 lookup table) and decode like bitmap
//   bytes (AVX-512: two bytes -> a 16-column mask -> decode16 of the next 8 values; AVX2: one byte
//   -> 8 columns through a permutation table, and at batch 1 x is gathered to the stored values
//   instead: two index bytes -> 8 x values for 8 stored values);
//   other n:m: the positions of a chunk of values are decoded to column numbers, then x is gathered
//   as for CSR; portable: the decoder's scalar loop.
// lanes / lanes_t / sddmm: the generic batch-in-lanes kernels (lanes.h, sddmm.h) over NmDec; for
//   2:4 the AVX-512 lanes decoder compresses a column iota per 16 columns (vpcompressd).
#pragma once

#include "lanes.h"
#include "nm.h"
#include "sddmm.h"
#if defined(__AVX512F__)
#include "simd_avx512.h"
#elif defined(__AVX2__)
#include "simd_avx2.h"
#endif

namespace sf {
namespace {

#if defined(__AVX512F__)
inline __mmask16 nm_mask24(const uint8_t* ib) {
  return static_cast<__mmask16>(kNm24.mask[ib[0]] | (kNm24.mask[ib[1]] << 8));
}

// 2:4 at batch 1: rows walked in pairs (walk_row_pairs, common.h), 16 stored values per 32 columns.
template <VT V>
void nm_rows24_x1(const NmView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b) {
  const float* x = p.x + b * p.in;
  float* y = p.y + b * p.out;
  const int64_t cols = w.cols, cols32 = cols / 32 * 32, total = w.rows * w.vpr;
  walk_row_pairs(
      r0, r1, cols32, 32,
      [&](int64_t r) { return v512::RowWalk{w.idx + r * w.ibpr, r * w.vpr, _mm512_setzero_ps(), _mm512_setzero_ps()}; },
      [&](v512::RowWalk& rw, int64_t c) {
        v512::prefetch_l2(static_cast<const char*>(w.val) + rw.vp * v512::val_bytes<V>(), v512::kPrefetchBytes);
        const uint8_t* ib = rw.bits + c / 8;
        const bool safe = rw.vp + 24 <= total;
        const __m512 w0 = v512::decode16<V>(w.val, rw.vp, nm_mask24(ib), safe);
        const __m512 w1 = v512::decode16<V>(w.val, rw.vp + 8, nm_mask24(ib + 2), safe);
        rw.vp += 16;
        rw.a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + c), rw.a0);
        rw.a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + c + 16), rw.a1);
      },
      [&](v512::RowWalk& rw, int64_t r) {
        for (int64_t c = cols32; c < cols; c += 16) {
          const int64_t nc = min64(16, cols - c);  // a multiple of 4
          uint32_t mb = kNm24.mask[rw.bits[c / 8]];
          if (nc > 8) mb |= static_cast<uint32_t>(kNm24.mask[rw.bits[c / 8 + 1]]) << 8;
          const __mmask16 cm = v512::first_lanes(nc);
          rw.a0 = _mm512_fmadd_ps(v512::decode16<V>(w.val, rw.vp, mb & cm, false), _mm512_maskz_loadu_ps(cm, x + c), rw.a0);
          rw.vp += nc / 2;
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(rw.a0, rw.a1)) + (p.bias ? p.bias[r] : 0.f);
      });
}

template <VT V, int NB>
void nm_rows24_nb(const NmView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
  const float* xs[NB];
  for (int nb = 0; nb < NB; ++nb) xs[nb] = p.x + (b0 + nb) * p.in;
  const int64_t cols = w.cols, total = w.rows * w.vpr;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* irow = w.idx + r * w.ibpr;
    int64_t vp = r * w.vpr;
    __m512 acc[NB][4];
    for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= cols; c += 64, vp += 32) {
      const uint8_t* ib = irow + c / 8;
      v512::prefetch(static_cast<const char*>(w.val) + vp * v512::val_bytes<V>(), v512::kPrefetchBytes);
      if constexpr (V == VT::f32) v512::prefetch(static_cast<const float*>(w.val) + vp + 16, v512::kPrefetchBytes);
      v512::prefetch(ib, v512::kPrefetchBytes);
      const bool safe = vp + 40 <= total;
      const __m512 w0 = v512::decode16<V>(w.val, vp, nm_mask24(ib), safe);
      const __m512 w1 = v512::decode16<V>(w.val, vp + 8, nm_mask24(ib + 2), safe);
      const __m512 w2 = v512::decode16<V>(w.val, vp + 16, nm_mask24(ib + 4), safe);
      const __m512 w3 = v512::decode16<V>(w.val, vp + 24, nm_mask24(ib + 6), safe);
      for (int nb = 0; nb < NB; ++nb) {
        acc[nb][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs[nb] + c), acc[nb][0]);
        acc[nb][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xs[nb] + c + 16), acc[nb][1]);
        acc[nb][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xs[nb] + c + 32), acc[nb][2]);
        acc[nb][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xs[nb] + c + 48), acc[nb][3]);
      }
    }
    for (; c < cols; c += 16) {
      const int64_t nc = min64(16, cols - c);  // a multiple of 4
      uint32_t mb = kNm24.mask[irow[c / 8]];
      if (nc > 8) mb |= static_cast<uint32_t>(kNm24.mask[irow[c / 8 + 1]]) << 8;
      const __mmask16 cm = v512::first_lanes(nc);
      const __m512 w0 = v512::decode16<V>(w.val, vp, mb & cm, false);
      vp += nc / 2;
      for (int nb = 0; nb < NB; ++nb) acc[nb][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(cm, xs[nb] + c), acc[nb][0]);
    }
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int nb = 0; nb < NB; ++nb) {
      const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[nb][0], acc[nb][1]), _mm512_add_ps(acc[nb][2], acc[nb][3]));
      p.y[(b0 + nb) * p.out + r] = _mm512_reduce_add_ps(s) + bv;
    }
  }
}

template <VT V, int NB>
void nm_rows_any_nb(const NmView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
  constexpr int64_t kChunk = 256;
  alignas(64) int32_t cols_buf[kChunk];
  const float* xs[NB];
  for (int nb = 0; nb < NB; ++nb) xs[nb] = p.x + (b0 + nb) * p.in;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* irow = w.idx + r * w.ibpr;
    __m512 a0[NB], a1[NB];
    for (int nb = 0; nb < NB; ++nb) a0[nb] = a1[nb] = _mm512_setzero_ps();
    for (int64_t v0 = 0; v0 < w.vpr; v0 += kChunk) {
      const int64_t cnt = min64(kChunk, w.vpr - v0);
      nm_decode_cols(w, irow, v0, cnt, cols_buf);
      v512::gather_dot<int32_t, V, NB>(cols_buf, w.val, r * w.vpr + v0, cnt, xs, a0, a1);
    }
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int nb = 0; nb < NB; ++nb) p.y[(b0 + nb) * p.out + r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[nb], a1[nb])) + bv;
  }
}

// NmDec plus, for 2:4, a vectorised collect for the lanes kernels: two index bytes give the
// 16-column keep-mask (kNm24), which compresses a column iota into the entry list (8 entries per
// 16 columns); values are contiguous per row. Other n:m use the generic collect.
template <VT V>
struct NmLanesDec24 : NmDec<V> {
  using Base = NmDec<V>;
  using typename Base::Cur;
  explicit NmLanesDec24(const NmView& w) : Base(w) {}
  static constexpr VT kValues = V;  // the lanes FMA loop widens bf16 values itself
  int64_t collect(Cur& c, int64_t cend, int32_t* idx, const void** vals) const {
    const int64_t G = this->w.cols / 4;
    const int64_t gend = min64(G, (cend + 3) / 4);  // groups whose first column is < cend
    int64_t g = c.g, n = 0;
    for (; g + 4 <= gend; g += 4) {  // g is even: whole index bytes
      const uint32_t m = kNm24.mask[c.irow[g >> 1]] | (static_cast<uint32_t>(kNm24.mask[c.irow[(g >> 1) + 1]]) << 8);
      n = v512::append_cols(idx, n, _mm512_set1_epi32(static_cast<int32_t>(g * 4)), m);
    }
    for (; g < gend; ++g) {
      const unsigned nib = (c.irow[g >> 1] >> ((g & 1) * 4)) & 15u;
      idx[n++] = static_cast<int32_t>(g * 4 + (nib & 3));
      idx[n++] = static_cast<int32_t>(g * 4 + (nib >> 2));
    }
    *vals = static_cast<const char*>(this->w.val) + (c.vbase + 2 * c.g) * v512::val_bytes<V>();
    // the next tile holds as many values and index bytes
    v512::prefetch_span(static_cast<const char*>(this->w.val) + (c.vbase + 2 * g) * v512::val_bytes<V>(), n * v512::val_bytes<V>());
    v512::prefetch_span(c.irow + (g >> 1), (g - c.g) / 2);
    c.g = g;
    return n;
  }
};

#elif defined(__AVX2__)
// 2:4 at batch 1: rows walked in pairs (walk_row_pairs, common.h), 16 stored values per 32 columns,
// x gathered to the values (simd_avx2.h nm24_x16): every lane a stored value, no zero lanes.
template <VT V>
void nm_rows24_x1(const NmView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b) {
  const float* x = p.x + b * p.in;
  float* y = p.y + b * p.out;
  const int64_t cols = w.cols, cols32 = cols / 32 * 32;
  walk_row_pairs(
      r0, r1, cols32, 32,
      [&](int64_t r) { return v256::RowWalk{w.idx + r * w.ibpr, r * w.vpr, _mm256_setzero_ps(), _mm256_setzero_ps()}; },
      [&](v256::RowWalk& rw, int64_t c) {
        v256::prefetch_l2(static_cast<const char*>(w.val) + rw.vp * v256::val_bytes<V>(), v256::kPrefetchBytes);
        const uint8_t* ib = rw.bits + c / 8;
        rw.a0 = _mm256_fmadd_ps(v256::val8<V>(w.val, rw.vp), v256::nm24_x16(x + c, ib), rw.a0);
        rw.a1 = _mm256_fmadd_ps(v256::val8<V>(w.val, rw.vp + 8), v256::nm24_x16(x + c + 16, ib + 2), rw.a1);
        rw.vp += 16;
      },
      [&](v256::RowWalk& rw, int64_t r) {
        for (int64_t c = cols32; c < cols; c += 8) {
          const int64_t nc = min64(8, cols - c);  // 4 or 8 columns: 2 or 4 stored values
          const __m256 xs = _mm256_permutevar8x32_ps(_mm256_maskload_ps(x + c, v256::first_lanes(nc)), v256::nm24_pos(rw.bits[c / 8]));
          rw.a0 = _mm256_fmadd_ps(v256::val8_n<V>(w.val, rw.vp, nc / 2), xs, rw.a0);
          rw.vp += nc / 2;
        }
        y[r] = v256::hsum(_mm256_add_ps(rw.a0, rw.a1)) + (p.bias ? p.bias[r] : 0.f);
      });
}

template <VT V, int NB>
void nm_rows24_nb(const NmView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
  const float* xs[NB];
  for (int nb = 0; nb < NB; ++nb) xs[nb] = p.x + (b0 + nb) * p.in;
  const int64_t cols = w.cols, total = w.rows * w.vpr;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* irow = w.idx + r * w.ibpr;
    int64_t vp = r * w.vpr;
    __m256 acc[NB][2];
    for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16, vp += 8) {
      if ((c & 31) == 0) v256::prefetch(static_cast<const char*>(w.val) + vp * v256::val_bytes<V>(), v256::kPrefetchBytes);
      if ((c & 255) == 0) v256::prefetch(irow + c / 8, v256::kPrefetchBytes);
      const __m256 w0 = v256::expand8<V>(w.val, vp, kNm24.mask[irow[c / 8]], vp + 8 <= total);
      const __m256 w1 = v256::expand8<V>(w.val, vp + 4, kNm24.mask[irow[c / 8 + 1]], vp + 12 <= total);
      for (int nb = 0; nb < NB; ++nb) {
        acc[nb][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[nb] + c), acc[nb][0]);
        acc[nb][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs[nb] + c + 8), acc[nb][1]);
      }
    }
    for (; c < cols; c += 8) {
      const int64_t nc = min64(8, cols - c);  // 4 or 8
      const unsigned m = kNm24.mask[irow[c / 8]] & ((1u << nc) - 1u);
      const __m256 w0 = v256::expand8<V>(w.val, vp, m, vp + 8 <= total);
      vp += nc / 2;
      for (int nb = 0; nb < NB; ++nb) {
        acc[nb][0] = _mm256_fmadd_ps(w0, _mm256_maskload_ps(xs[nb] + c, v256::first_lanes(nc)), acc[nb][0]);
      }
    }
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int nb = 0; nb < NB; ++nb) p.y[(b0 + nb) * p.out + r] = v256::hsum(_mm256_add_ps(acc[nb][0], acc[nb][1])) + bv;
  }
}

template <VT V, int NB>
void nm_rows_any_nb(const NmView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
  constexpr int64_t kChunk = 256;
  alignas(32) int32_t cols_buf[kChunk];
  const float* xs[NB];
  for (int nb = 0; nb < NB; ++nb) xs[nb] = p.x + (b0 + nb) * p.in;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* irow = w.idx + r * w.ibpr;
    __m256 a0[NB], a1[NB];
    float tail[NB];
    for (int nb = 0; nb < NB; ++nb) {
      a0[nb] = a1[nb] = _mm256_setzero_ps();
      tail[nb] = 0.f;
    }
    for (int64_t v0 = 0; v0 < w.vpr; v0 += kChunk) {
      const int64_t cnt = min64(kChunk, w.vpr - v0);
      nm_decode_cols(w, irow, v0, cnt, cols_buf);
      v256::gather_dot<int32_t, V, NB>(cols_buf, w.val, r * w.vpr + v0, cnt, xs, a0, a1, tail);
    }
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int nb = 0; nb < NB; ++nb) p.y[(b0 + nb) * p.out + r] = v256::hsum(_mm256_add_ps(a0[nb], a1[nb])) + tail[nb] + bv;
  }
}

#endif

// body(Dec<V>(w)) with the value type of w
template <template <VT> class Dec, class Body>
void with_nm(const NmView& w, Body&& body) {
  if (w.vt == VT::f32) body(Dec<VT::f32>(w)); else body(Dec<VT::bf16>(w));
}

void nm_rows(const NmView& w, const Problem& p, int64_t r0, int64_t r1) {
  with_nm<NmDec>(w, [&](const auto& dec) {
#if defined(__AVX2__)
    constexpr VT V = std::decay_t<decltype(dec)>::kVT;
    const bool is24 = w.n == 2 && w.m == 4;
    for_batch_quads(p.B, [&](auto nb, int64_t b0) {
      constexpr int NB = decltype(nb)::value;
      if constexpr (NB == 1) {
        if (is24) return nm_rows24_x1<V>(w, p, r0, r1, b0);
      }
      is24 ? nm_rows24_nb<V, NB>(w, p, r0, r1, b0) : nm_rows_any_nb<V, NB>(w, p, r0, r1, b0);
    });
#else
    rows_dec(dec, p, r0, r1);
#endif
  });
}

// the decoders of the generic kernels (sddmm.h: DecoderKernels); for 2:4 the AVX-512 lanes decoder
// collects whole groups at once
struct NmFormat {
  using View = NmView;
  template <class Body> static void lanes_dec(const NmView& w, Body&& body) {
#if defined(__AVX512F__)
    if (w.n == 2 && w.m == 4) return with_nm<NmLanesDec24>(w, body);
#endif
    with_nm<NmDec>(w, body);
  }
  template <class Body> static void dec(const NmView& w, Body&& body) { with_nm<NmDec>(w, body); }
  static int64_t first(const NmView& w, int64_t r) { return r * w.vpr; }
};

// this file's kernel table (nm.h: scalar::, avx2::, avx512::, avx512vp::nm)
using NmGeneric = DecoderKernels<NmFormat>;
constexpr NmKernels kNmKernels = {nm_rows, NmGeneric::lanes, NmGeneric::lanes_t, NmGeneric::sddmm};

}  // namespace
}  // namespace sf
