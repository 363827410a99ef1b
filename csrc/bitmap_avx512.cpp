// Bitmap kernels, AVX-512. rows: 64 columns per step; each 16-bit slice of the bitmap places the
// next stored values at their columns in one register (decode16: vpermps with indices from a lookup
// table, or from vpopcntd in the AVX512_VPOPCNTDQ build bitmap_avx512vp.cpp; both beat vexpandps
// on Zen 5), so x is read contiguously and only kept values are read from memory.
#include "bitmap.h"
#include "lanes.h"
#include "sddmm.h"
#include "simd_avx512.h"

namespace sf {
#ifndef SF_AVX512_NS  // *_avx512vp.cpp compiles this file again under another name
#define SF_AVX512_NS avx512
#endif
namespace SF_AVX512_NS {
namespace {

template <VT V, int NB>
void rows_nb(const BitmapView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
  const float* xs[NB];
  for (int nb = 0; nb < NB; ++nb) xs[nb] = p.x + (b0 + nb) * p.in;
  const int64_t cols = w.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.bits + r * w.bpr;
    int64_t vp = w.row_offsets[r];
    __m512 acc[NB][4];
    for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= cols; c += 64) {
      v512::prefetch(static_cast<const char*>(w.val) + vp * v512::val_bytes<V>(), v512::kPrefetchBytes);
      v512::prefetch(static_cast<const char*>(w.val) + (vp + 16) * v512::val_bytes<V>(), v512::kPrefetchBytes);
      v512::prefetch(row + c / 8, v512::kPrefetchBytes);
      uint64_t m;
      std::memcpy(&m, row + c / 8, 8);
      const __mmask16 m0 = static_cast<__mmask16>(m), m1 = static_cast<__mmask16>(m >> 16);
      const __mmask16 m2 = static_cast<__mmask16>(m >> 32), m3 = static_cast<__mmask16>(m >> 48);
      const int64_t o1 = __builtin_popcount(m0);
      const int64_t o2 = o1 + __builtin_popcount(m1);
      const int64_t o3 = o2 + __builtin_popcount(m2);
      const bool safe = vp + 64 <= w.nnz;
#if defined(__AVX512VPOPCNTDQ__)
      const uint8_t* word = row + c / 8;
      const __m512 w0 = v512::decode16_word<V>(w.val, vp, word, 0, m0, safe);
      const __m512 w1 = v512::decode16_word<V>(w.val, vp + o1, word, 1, m1, safe);
      const __m512 w2 = v512::decode16_word<V>(w.val, vp + o2, word, 2, m2, safe);
      const __m512 w3 = v512::decode16_word<V>(w.val, vp + o3, word, 3, m3, safe);
#else
      const __m512 w0 = v512::decode16<V>(w.val, vp, m0, safe);
      const __m512 w1 = v512::decode16<V>(w.val, vp + o1, m1, safe);
      const __m512 w2 = v512::decode16<V>(w.val, vp + o2, m2, safe);
      const __m512 w3 = v512::decode16<V>(w.val, vp + o3, m3, safe);
#endif
      vp += __builtin_popcountll(m);
      for (int nb = 0; nb < NB; ++nb) {
        acc[nb][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs[nb] + c), acc[nb][0]);
        acc[nb][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xs[nb] + c + 16), acc[nb][1]);
        acc[nb][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xs[nb] + c + 32), acc[nb][2]);
        acc[nb][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xs[nb] + c + 48), acc[nb][3]);
      }
    }
    for (; c < cols; c += 16) {
      const int64_t nc = min64(16, cols - c);
      uint32_t mb = row[c / 8];
      if (nc > 8) mb |= static_cast<uint32_t>(row[c / 8 + 1]) << 8;
      const __mmask16 cm = v512::first_lanes(nc);
      const __mmask16 m = static_cast<__mmask16>(mb) & cm;
      const __m512 w0 = v512::decode16<V>(w.val, vp, m, false);
      vp += __builtin_popcount(m);
      for (int nb = 0; nb < NB; ++nb) acc[nb][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(cm, xs[nb] + c), acc[nb][0]);
    }
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int nb = 0; nb < NB; ++nb) {
      const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[nb][0], acc[nb][1]), _mm512_add_ps(acc[nb][2], acc[nb][3]));
      p.y[(b0 + nb) * p.out + r] = _mm512_reduce_add_ps(s) + bv;
    }
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

// BitmapDec plus a vectorised collect for the lanes kernels: each 16-bit slice of the bitmap
// compresses a column iota (vpcompressd) into the entry list; f32 values are used in place.
template <VT V>
struct LanesDec : BitmapDec<V> {
  using Base = BitmapDec<V>;
  using typename Base::Cur;
  explicit LanesDec(const BitmapView& w) : Base(w) {}
  static constexpr VT kValues = V;  // the lanes FMA loop widens bf16 values itself
  int64_t collect(Cur& c, int64_t cend, int32_t* idx, const void** vals) const {
    const int64_t lim = min64(cend, this->cols);
    int64_t n = 0, word = c.word;
    for (; word * 64 < lim; ++word) {
      const uint64_t m = bitmap_word(c.row, this->bpr, word);
      if (!m) continue;
      const __m512i c0 = _mm512_set1_epi32(static_cast<int32_t>(word * 64));
      n = v512::append_cols(idx, n, c0, static_cast<uint32_t>(m & 0xffffu));
      n = v512::append_cols(idx, n, _mm512_add_epi32(c0, _mm512_set1_epi32(16)), static_cast<uint32_t>((m >> 16) & 0xffffu));
      n = v512::append_cols(idx, n, _mm512_add_epi32(c0, _mm512_set1_epi32(32)), static_cast<uint32_t>((m >> 32) & 0xffffu));
      n = v512::append_cols(idx, n, _mm512_add_epi32(c0, _mm512_set1_epi32(48)), static_cast<uint32_t>(m >> 48));
    }
    *vals = static_cast<const char*>(this->val) + (c.vp) * v512::val_bytes<V>();
    c.word = word;
    c.vp += n;
    // the next tile holds about as many values and bitmap words
    v512::prefetch_ahead<v512::kAheadEntries * v512::val_bytes<V>()>(static_cast<const char*>(this->val) + c.vp * v512::val_bytes<V>());
    v512::prefetch_ahead<128>(c.row + word * 8);  // 1024 columns at most
    return n;
  }
};

void lanes(const BitmapView& w, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) {
  if (w.vt == VT::f32) lanes_rows(LanesDec<VT::f32>(w), p, lp, r0, r1, ybuf);
  else lanes_rows(LanesDec<VT::bf16>(w), p, lp, r0, r1, ybuf);
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

}  // namespace SF_AVX512_NS
}  // namespace sf
