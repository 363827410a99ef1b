// int8-valued bitmap / N:M / CSR row kernels (int8.h), written once and compiled per instruction set:
// int8.cpp (portable), int8_avx2.cpp and int8_avx512.cpp each include this header and export its
// table. Everything has internal linkage.
//
// One row loop serves both formats: a row is a run of kept columns, each 8-column byte of it
// described by a keep-mask (the bitmap byte itself; for 2:4 the kNm24 mask of the index byte; for
// other n:m a bitmap row built from the decoded positions), and its int8 values in column order.
//   AVX-512: 16 columns per step: a 16-byte load of the next values (masked near the end of the
//   buffer), vpmovsxbd to int32, vpexpandd to the set lanes, vcvtdq2ps, FMA with x.
//   AVX2: 8 columns per step: 8 bytes, vpmovsxbd, vpermd through the permutation table, zeroing
//   of the unset lanes, vcvtdq2ps, FMA.
//   Portable: bit by bit.
// Each row's sum is multiplied by its scale once at the end.
#pragma once

#include <vector>

#include "int8.h"
#include "lanes.h"
#if defined(__AVX512F__)
#include "simd_avx512.h"
#elif defined(__AVX2__)
#include "simd_avx2.h"
#endif

namespace sf {
namespace {

// sums[nb] = sum over the kept columns j of one row of q[k] * xs[nb][j], k counting from vp.
// mask8(i) is the keep-mask of columns [8i, 8i + 8) (bits past `cols` are ignored); kPer8 > 0 says
// every whole byte keeps exactly kPer8 columns (2:4: 4), so value offsets need no popcounts. `end`
// is the length of the q buffer (no load reaches past it). The offsets of the slices of one step
// come from independent popcounts: the only loop-carried chain is one add per step.
#if defined(__AVX512F__)
inline __m512 i8_expand16(const int8_t* q, int64_t vp, uint32_t m, bool safe) {
  __m128i raw;
  if (safe) {
    raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + vp));
  } else {
    const int pc = __builtin_popcount(m);
    raw = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << pc) - 1u), q + vp);
  }
  const __m512i v = _mm512_maskz_expand_epi32(static_cast<__mmask16>(m), _mm512_cvtepi8_epi32(raw));
  return _mm512_cvtepi32_ps(v);
}

template <int NB, int kPer8, class Mask8>
inline void i8_row_dot(const int8_t* q, int64_t vp, int64_t end, int64_t cols, Mask8&& mask8, const float* const* xs,
                       float* sums) {
  __m512 acc[NB][4];
  for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = _mm512_setzero_ps();
  auto mask16 = [&](int64_t c) { return mask8(c / 8) | (static_cast<uint32_t>(mask8(c / 8 + 1)) << 8); };
  int64_t c = 0;
  for (; c + 64 <= cols; c += 64) {
    v512::prefetch(q + vp, v512::kPrefetchBytes);
    const uint32_t m0 = mask16(c), m1 = mask16(c + 16), m2 = mask16(c + 32), m3 = mask16(c + 48);
    int64_t o1, o2, o3, step;
    if constexpr (kPer8 > 0) {
      o1 = 2 * kPer8, o2 = 4 * kPer8, o3 = 6 * kPer8, step = 8 * kPer8;
    } else {
      o1 = __builtin_popcount(m0);
      o2 = o1 + __builtin_popcount(m1);
      const int64_t p23 = __builtin_popcount(m2);
      o3 = o2 + p23;
      step = o3 + __builtin_popcount(m3);
    }
    const bool safe = vp + o3 + 16 <= end;
    const __m512 w0 = i8_expand16(q, vp, m0, safe);
    const __m512 w1 = i8_expand16(q, vp + o1, m1, safe);
    const __m512 w2 = i8_expand16(q, vp + o2, m2, safe);
    const __m512 w3 = i8_expand16(q, vp + o3, m3, safe);
    vp += step;
    for (int nb = 0; nb < NB; ++nb) {
      acc[nb][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs[nb] + c), acc[nb][0]);
      acc[nb][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xs[nb] + c + 16), acc[nb][1]);
      acc[nb][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xs[nb] + c + 32), acc[nb][2]);
      acc[nb][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xs[nb] + c + 48), acc[nb][3]);
    }
  }
  for (; c < cols; c += 16) {
    const int64_t nc = min64(16, cols - c);
    uint32_t m = mask8(c / 8);
    if (nc > 8) m |= static_cast<uint32_t>(mask8(c / 8 + 1)) << 8;
    const __mmask16 cm = v512::first_lanes(nc);
    m &= cm;
    const __m512 w0 = i8_expand16(q, vp, m, vp + 16 <= end);
    vp += __builtin_popcount(m);
    for (int nb = 0; nb < NB; ++nb) acc[nb][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(cm, xs[nb] + c), acc[nb][0]);
  }
  for (int nb = 0; nb < NB; ++nb) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[nb][0], acc[nb][1]), _mm512_add_ps(acc[nb][2], acc[nb][3]));
    sums[nb] = _mm512_reduce_add_ps(s);
  }
}

#elif defined(__AVX2__)
inline __m256 i8_expand8(const int8_t* q, int64_t vp, unsigned m, bool safe) {
  __m128i raw;
  if (safe) {
    raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + vp));
  } else {
    int8_t tmp[16] = {0};
    const int pc = __builtin_popcount(m);
    if (pc) std::memcpy(tmp, q + vp, static_cast<size_t>(pc));
    raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  __m256i v = _mm256_cvtepi8_epi32(raw);
  v = _mm256_permutevar8x32_epi32(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v256::kPerm.idx[m])));
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bits), bits);
  return _mm256_cvtepi32_ps(_mm256_and_si256(v, on));
}

template <int NB, int kPer8, class Mask8>
inline void i8_row_dot(const int8_t* q, int64_t vp, int64_t end, int64_t cols, Mask8&& mask8, const float* const* xs,
                       float* sums) {
  __m256 acc[NB][4];
  for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    if ((c & 127) == 0) v256::prefetch(q + vp, v256::kPrefetchBytes);
    const unsigned m0 = mask8(c / 8), m1 = mask8(c / 8 + 1), m2 = mask8(c / 8 + 2), m3 = mask8(c / 8 + 3);
    int64_t o1, o2, o3, step;
    if constexpr (kPer8 > 0) {
      o1 = kPer8, o2 = 2 * kPer8, o3 = 3 * kPer8, step = 4 * kPer8;
    } else {
      o1 = __builtin_popcount(m0);
      o2 = o1 + __builtin_popcount(m1);
      o3 = o2 + __builtin_popcount(m2);
      step = o3 + __builtin_popcount(m3);
    }
    const bool safe = vp + o3 + 8 <= end;
    const __m256 w0 = i8_expand8(q, vp, m0, safe);
    const __m256 w1 = i8_expand8(q, vp + o1, m1, safe);
    const __m256 w2 = i8_expand8(q, vp + o2, m2, safe);
    const __m256 w3 = i8_expand8(q, vp + o3, m3, safe);
    vp += step;
    for (int nb = 0; nb < NB; ++nb) {
      acc[nb][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[nb] + c), acc[nb][0]);
      acc[nb][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs[nb] + c + 8), acc[nb][1]);
      acc[nb][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xs[nb] + c + 16), acc[nb][2]);
      acc[nb][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xs[nb] + c + 24), acc[nb][3]);
    }
  }
  for (; c < cols; c += 8) {
    const int64_t nc = min64(8, cols - c);
    const unsigned m = mask8(c / 8) & ((1u << nc) - 1u);
    const __m256 w0 = i8_expand8(q, vp, m, vp + 8 <= end);
    vp += __builtin_popcount(m);
    for (int nb = 0; nb < NB; ++nb) {
      acc[nb][0] = _mm256_fmadd_ps(w0, _mm256_maskload_ps(xs[nb] + c, v256::first_lanes(nc)), acc[nb][0]);
    }
  }
  for (int nb = 0; nb < NB; ++nb) {
    sums[nb] = v256::hsum(_mm256_add_ps(_mm256_add_ps(acc[nb][0], acc[nb][1]), _mm256_add_ps(acc[nb][2], acc[nb][3])));
  }
}

#else
template <int NB, int kPer8, class Mask8>
inline void i8_row_dot(const int8_t* q, int64_t vp, int64_t end, int64_t cols, Mask8&& mask8, const float* const* xs,
                       float* sums) {
  (void)end;
  float acc[NB] = {};
  for (int64_t c = 0; c < cols; c += 8) {
    const unsigned m = mask8(c / 8) & (cols - c >= 8 ? 0xffu : ((1u << (cols - c)) - 1u));
    for (int t = 0; t < 8; ++t) {
      if (!((m >> t) & 1)) continue;
      const float wv = static_cast<float>(q[vp++]);
      for (int nb = 0; nb < NB; ++nb) acc[nb] += wv * xs[nb][c + t];
    }
  }
  for (int nb = 0; nb < NB; ++nb) sums[nb] = acc[nb];
}
#endif

// y[b, r] = scales[r] * (row r . x_b) + bias[r] for rows [r0, r1) and every batch row, NB at a time
template <class RowFn>
void i8_rows(const Problem& p, const float* scales, int64_t r0, int64_t r1, RowFn&& row) {
  for_batch_quads(p.B, [&](auto nbc, int64_t b0) {
    constexpr int NB = decltype(nbc)::value;
    const float* xs[NB];
    for (int nb = 0; nb < NB; ++nb) xs[nb] = p.x + (b0 + nb) * p.in;
    for (int64_t r = r0; r < r1; ++r) {
      float sums[NB];
      row(r, xs, sums, nbc);
      const float bv = p.bias ? p.bias[r] : 0.f;
      for (int nb = 0; nb < NB; ++nb) p.y[(b0 + nb) * p.out + r] = scales[r] * sums[nb] + bv;
    }
  });
}

void bitmap_i8_rows(const BitmapI8& wq, const Problem& p, int64_t r0, int64_t r1) {
  const BitmapView& w = wq.w;
  const int8_t* q = static_cast<const int8_t*>(w.val);
  i8_rows(p, wq.scales, r0, r1, [&](int64_t r, const float* const* xs, float* sums, auto nbc) {
    const uint8_t* row = w.bits + r * w.bpr;
    i8_row_dot<decltype(nbc)::value, 0>(q, w.row_offsets[r], w.nnz, w.cols, [row](int64_t i) { return row[i]; }, xs, sums);
  });
}

void nm_i8_rows(const NmI8& wq, const Problem& p, int64_t r0, int64_t r1) {
  const NmView& w = wq.w;
  const int8_t* q = static_cast<const int8_t*>(w.val);
  const int64_t total = w.rows * w.vpr;
  if (w.n == 2 && w.m == 4) {  // each index byte is two groups: kNm24 gives their 8-column mask
    i8_rows(p, wq.scales, r0, r1, [&](int64_t r, const float* const* xs, float* sums, auto nbc) {
      const uint8_t* irow = w.idx + r * w.ibpr;
      i8_row_dot<decltype(nbc)::value, 4>(q, r * w.vpr, total, w.cols, [irow](int64_t i) { return kNm24.mask[irow[i]]; },
                                       xs, sums);
    });
    return;
  }
  // other n:m: the row's positions are decoded into a bitmap row first (values are in column order)
  std::vector<uint8_t> bits(static_cast<size_t>((w.cols + 7) / 8 + 8));
  std::vector<int32_t> cols(static_cast<size_t>(w.vpr > 0 ? w.vpr : 1));
  int64_t decoded = -1;
  i8_rows(p, wq.scales, r0, r1, [&](int64_t r, const float* const* xs, float* sums, auto nbc) {
    if (decoded != r) {
      std::memset(bits.data(), 0, bits.size());
      nm_decode_cols(w, w.idx + r * w.ibpr, 0, w.vpr, cols.data());
      for (int64_t k = 0; k < w.vpr; ++k) bits[cols[k] >> 3] |= static_cast<uint8_t>(1u << (cols[k] & 7));
      decoded = r;
    }
    const uint8_t* row = bits.data();
    i8_row_dot<decltype(nbc)::value, 0>(q, r * w.vpr, total, w.cols, [row](int64_t i) { return row[i]; }, xs, sums);
  });
}

// CSR: sum over the row's entries of q[k] * x[col[k]] (v512 / v256 gather_dot with int8 values)
template <class I, int NB>
inline void csr_i8_row_dot(const CsrView& w, int64_t r, const float* const* xs, float* sums) {
  const I* col = static_cast<const I*>(w.col);
  const int64_t q0 = w.row_ptr[r], q1 = w.row_ptr[r + 1];
#if defined(__AVX512F__)
  __m512 a0[NB], a1[NB];
  for (int nb = 0; nb < NB; ++nb) a0[nb] = a1[nb] = _mm512_setzero_ps();
  v512::gather_dot<I, VT::i8, NB>(col + q0, w.val, q0, q1 - q0, xs, a0, a1);
  for (int nb = 0; nb < NB; ++nb) sums[nb] = _mm512_reduce_add_ps(_mm512_add_ps(a0[nb], a1[nb]));
#elif defined(__AVX2__)
  __m256 a0[NB], a1[NB];
  float tail[NB];
  for (int nb = 0; nb < NB; ++nb) {
    a0[nb] = a1[nb] = _mm256_setzero_ps();
    tail[nb] = 0.f;
  }
  v256::gather_dot<I, VT::i8, NB>(col + q0, w.val, q0, q1 - q0, xs, a0, a1, tail);
  for (int nb = 0; nb < NB; ++nb) sums[nb] = v256::hsum(_mm256_add_ps(a0[nb], a1[nb])) + tail[nb];
#else
  const int8_t* q = static_cast<const int8_t*>(w.val);
  for (int nb = 0; nb < NB; ++nb) sums[nb] = 0.f;
  for (int64_t k = q0; k < q1; ++k)
    for (int nb = 0; nb < NB; ++nb) sums[nb] += static_cast<float>(q[k]) * xs[nb][col[k]];
#endif
}

void csr_i8_rows(const CsrI8& wq, const Problem& p, int64_t r0, int64_t r1) {
  const CsrView& w = wq.w;
  i8_rows(p, wq.scales, r0, r1, [&](int64_t r, const float* const* xs, float* sums, auto nbc) {
    if (w.col_u16) csr_i8_row_dot<uint16_t, decltype(nbc)::value>(w, r, xs, sums);
    else csr_i8_row_dot<int32_t, decltype(nbc)::value>(w, r, xs, sums);
  });
}

constexpr I8Kernels kI8Kernels = {bitmap_i8_rows, nm_i8_rows, csr_i8_rows};

}  // namespace
}  // namespace sf
