// Bitmap kernels, written once and compiled per instruction set (like bsr_kernels.h): bitmap.cpp
// (portable, SSE), bitmap_avx2.cpp, bitmap_avx512.cpp and bitmap_avx512vp.cpp (AVX-512 with
// AVX512_VPOPCNTDQ) each include this header and export its table. Everything has internal linkage.
//
// rows (batch 1-3, or algo=rows): x is read contiguously and only kept values are read.
//   AVX-512: 64 columns per step; each 16-bit slice of the bitmap places the next stored values at
//   their columns in one register (decode16: vpermps with indices from a lookup table, or from
//   vpopcntd with AVX512_VPOPCNTDQ; both beat vexpandps on Zen 5). AVX2: each bitmap byte decodes 8
//   columns through a permutation table (at batch 1 one masked load and one vpermps per byte,
//   rows walked in pairs). Portable: the decoder's scalar loop.
// lanes / lanes_t / sddmm: the generic batch-in-lanes kernels (lanes.h, sddmm.h) over BitmapDec;
//   the AVX-512 lanes decoder compresses a column iota per 16-bit slice (vpcompressd).
#pragma once

#include "bitmap.h"
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
// 32 columns [c, c + 32) of row `r` against x.
template <VT V>
inline void row_walk_step32(const BitmapView& w, v512::RowWalk& r, const float* x, int64_t c) {
  v512::prefetch_l2(static_cast<const char*>(w.val) + r.vp * v512::val_bytes<V>(), v512::kPrefetchBytes);
  uint32_t m;
  std::memcpy(&m, r.bits + c / 8, 4);
  const bool safe = r.vp + 32 <= w.nnz;
  const int64_t o1 = __builtin_popcount(m & 0xffffu);
#if defined(__AVX512VPOPCNTDQ__)
  const __m512 w0 = v512::decode16_word<V>(w.val, r.vp, r.bits + c / 8, 0, m & 0xffffu, safe);
  const __m512 w1 = v512::decode16_word<V>(w.val, r.vp + o1, r.bits + c / 8, 1, m >> 16, safe);
#else
  const __m512 w0 = v512::decode16<V>(w.val, r.vp, m & 0xffffu, safe);
  const __m512 w1 = v512::decode16<V>(w.val, r.vp + o1, m >> 16, safe);
#endif
  r.vp += __builtin_popcount(m);
  r.a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + c), r.a0);
  r.a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + c + 16), r.a1);
}

// The columns after the last whole 32-column step, 16 at a time, into a0.
template <VT V>
inline void row_walk_tail(const BitmapView& w, v512::RowWalk& r, const float* x, int64_t c) {
  for (; c < w.cols; c += 16) {
    const int64_t nc = min64(16, w.cols - c);
    uint32_t mb = r.bits[c / 8];
    if (nc > 8) mb |= static_cast<uint32_t>(r.bits[c / 8 + 1]) << 8;
    const __mmask16 cm = v512::first_lanes(nc);
    const __mmask16 m = static_cast<__mmask16>(mb) & cm;
    r.a0 = _mm512_fmadd_ps(v512::decode16<V>(w.val, r.vp, m, false), _mm512_maskz_loadu_ps(cm, x + c), r.a0);
    r.vp += __builtin_popcount(m);
  }
}

// Batch 1: rows walked in pairs (walk_row_pairs, common.h), each stream prefetched into L2 (an L1
// prefetch would hold one of the core's few fill buffers for the whole memory latency).
template <VT V>
void bitmap_rows_x1(const BitmapView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b) {
  const float* x = p.x + b * p.in;
  float* y = p.y + b * p.out;
  const int64_t cols32 = w.cols / 32 * 32;
  walk_row_pairs(
      r0, r1, cols32, 32,
      [&](int64_t r) { return v512::RowWalk{w.bits + r * w.bpr, w.row_offsets[r], _mm512_setzero_ps(), _mm512_setzero_ps()}; },
      [&](v512::RowWalk& rw, int64_t c) { row_walk_step32<V>(w, rw, x, c); },
      [&](v512::RowWalk& rw, int64_t r) {
        row_walk_tail<V>(w, rw, x, cols32);
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(rw.a0, rw.a1)) + (p.bias ? p.bias[r] : 0.f);
      });
}

template <VT V, int NB>
void bitmap_rows_nb(const BitmapView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
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

// BitmapDec plus a vectorised collect for the lanes kernels: each 16-bit slice of the bitmap
// compresses a column iota (vpcompressd) into the entry list; f32 values are used in place.
template <VT V>
struct BitmapLanesDec : BitmapDec<V> {
  using Base = BitmapDec<V>;
  using typename Base::Cur;
  explicit BitmapLanesDec(const BitmapView& w) : Base(w) {}
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

#elif defined(__AVX2__)
// 32 columns [c, c + 32) of row `r` against x: four bitmap bytes, each decoded by expand8.
template <VT V>
inline void row_walk_step32(const BitmapView& w, v256::RowWalk& r, const float* x, int64_t c) {
  v256::prefetch_l2(static_cast<const char*>(w.val) + r.vp * v256::val_bytes<V>(), v256::kPrefetchBytes);
  uint32_t m;
  std::memcpy(&m, r.bits + c / 8, 4);
  const bool safe = r.vp + 32 <= w.nnz;
  const unsigned m0 = m & 0xffu, m1 = (m >> 8) & 0xffu, m2 = (m >> 16) & 0xffu, m3 = m >> 24;
  const int64_t o1 = __builtin_popcount(m0), o2 = o1 + __builtin_popcount(m1), o3 = o2 + __builtin_popcount(m2);
  const __m256 w0 = v256::expand8<V>(w.val, r.vp, m0, safe);
  const __m256 w1 = v256::expand8<V>(w.val, r.vp + o1, m1, safe);
  const __m256 w2 = v256::expand8<V>(w.val, r.vp + o2, m2, safe);
  const __m256 w3 = v256::expand8<V>(w.val, r.vp + o3, m3, safe);
  r.vp += __builtin_popcount(m);
  r.a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c), r.a0);
  r.a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c + 8), r.a1);
  r.a0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + c + 16), r.a0);
  r.a1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + c + 24), r.a1);
}

// Batch 1: rows walked in pairs (walk_row_pairs, common.h), each value stream prefetched into L2.
template <VT V>
void bitmap_rows_x1(const BitmapView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b) {
  const float* x = p.x + b * p.in;
  float* y = p.y + b * p.out;
  const int64_t cols = w.cols, cols32 = cols / 32 * 32;
  walk_row_pairs(
      r0, r1, cols32, 32,
      [&](int64_t r) { return v256::RowWalk{w.bits + r * w.bpr, w.row_offsets[r], _mm256_setzero_ps(), _mm256_setzero_ps()}; },
      [&](v256::RowWalk& rw, int64_t c) { row_walk_step32<V>(w, rw, x, c); },
      [&](v256::RowWalk& rw, int64_t r) {
        for (int64_t c = cols32; c < cols; c += 8) {
          const int64_t nc = min64(8, cols - c);
          const unsigned m = rw.bits[c / 8] & ((1u << nc) - 1u);
          const __m256 w0 = v256::expand8<V>(w.val, rw.vp, m, false);
          rw.vp += __builtin_popcount(m);
          rw.a0 = _mm256_fmadd_ps(w0, _mm256_maskload_ps(x + c, v256::first_lanes(nc)), rw.a0);
        }
        y[r] = v256::hsum(_mm256_add_ps(rw.a0, rw.a1)) + (p.bias ? p.bias[r] : 0.f);
      });
}

template <VT V, int NB>
void bitmap_rows_nb(const BitmapView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
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
      const __m256 w0 = v256::expand8<V>(w.val, vp, m0, vp + 8 <= w.nnz);
      vp += __builtin_popcount(m0);
      const __m256 w1 = v256::expand8<V>(w.val, vp, m1, vp + 8 <= w.nnz);
      vp += __builtin_popcount(m1);
      for (int nb = 0; nb < NB; ++nb) {
        acc[nb][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[nb] + c), acc[nb][0]);
        acc[nb][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs[nb] + c + 8), acc[nb][1]);
      }
    }
    for (; c < cols; c += 8) {
      const int64_t nc = min64(8, cols - c);
      const unsigned m = row[c / 8] & ((1u << nc) - 1u);
      const __m256 w0 = v256::expand8<V>(w.val, vp, m, vp + 8 <= w.nnz);
      vp += __builtin_popcount(m);
      for (int nb = 0; nb < NB; ++nb) {
        acc[nb][0] = _mm256_fmadd_ps(w0, _mm256_maskload_ps(xs[nb] + c, v256::first_lanes(nc)), acc[nb][0]);
      }
    }
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int nb = 0; nb < NB; ++nb) p.y[(b0 + nb) * p.out + r] = v256::hsum(_mm256_add_ps(acc[nb][0], acc[nb][1])) + bv;
  }
}

#endif

#if !defined(__AVX512F__)
template <VT V>
using BitmapLanesDec = BitmapDec<V>;
#endif

// body(Dec<V>(w)) with the value type of w
template <template <VT> class Dec, class Body>
void with_bitmap(const BitmapView& w, Body&& body) {
  if (w.vt == VT::f32) body(Dec<VT::f32>(w)); else body(Dec<VT::bf16>(w));
}

void bitmap_rows(const BitmapView& w, const Problem& p, int64_t r0, int64_t r1) {
  with_bitmap<BitmapDec>(w, [&](const auto& dec) {
#if defined(__AVX2__)
    using Dec = std::decay_t<decltype(dec)>;
    for_batch_quads(p.B, [&](auto nb, int64_t b0) {
      if constexpr (decltype(nb)::value == 1) {
        bitmap_rows_x1<Dec::kVT>(w, p, r0, r1, b0);
        return;
      }
      bitmap_rows_nb<Dec::kVT, decltype(nb)::value>(w, p, r0, r1, b0);
    });
#else
    rows_dec(dec, p, r0, r1);
#endif
  });
}

// the decoders of the generic kernels (sddmm.h: DecoderKernels)
struct BitmapFormat {
  using View = BitmapView;
  template <class Body> static void lanes_dec(const BitmapView& w, Body&& body) { with_bitmap<BitmapLanesDec>(w, body); }
  template <class Body> static void dec(const BitmapView& w, Body&& body) { with_bitmap<BitmapDec>(w, body); }
  static int64_t first(const BitmapView& w, int64_t r) { return w.row_offsets[r]; }
};

// this file's kernel table (bitmap.h: scalar::, avx2::, avx512::, avx512vp::bitmap)
using BitmapGeneric = DecoderKernels<BitmapFormat>;
constexpr BitmapKernels kBitmapKernels = {bitmap_rows, BitmapGeneric::lanes, BitmapGeneric::lanes_t, BitmapGeneric::sddmm};

}  // namespace
}  // namespace sf
