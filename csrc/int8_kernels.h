// int8-valued bitmap / N:M / CSR row kernels (int8.h), written once and compiled per instruction set:
// int8.cpp (portable), int8_avx2.cpp, int8_avx2vnni.cpp, int8_avx512.cpp and int8_avx512vnni.cpp each
// include this header and export its table. Everything has internal linkage. The int8-activation
// (I8Act::int8) kernels are at the end: AVX512 VNNI / VBMI / VBMI2, AVX2 (with or without AVX-VNNI;
// also the avx512 table's), portable.
//
// One row loop serves both formats: a row is a run of kept columns, each 8-column byte of it
// described by a keep-mask (the bitmap byte itself; for 2:4 the kNm24 mask of the index byte; for
// other n:m a bitmap row built from the decoded positions), and its int8 values in column order.
//   AVX-512: 16 columns per step: a 16-byte load of the next values (masked near the end of the
//   buffer), vpmovsxbd to int32, vpexpandd to the set lanes, vcvtdq2ps, FMA with x.
//   AVX2: 8 columns per step: 8 bytes, vpmovsxbd, vpermd through the permutation table, zeroing
//   of the unset lanes, vcvtdq2ps, FMA; 2:4 instead widens 8 values at once and gathers the 8 x they
//   multiply (two vpermps of x and a blend per 16 columns, simd_avx2.h nm24_x16).
//   Portable: bit by bit.
// Each row's sum is multiplied by its scale once at the end.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
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

// 2:4 with float32 x: 16 values (8 groups, 32 columns, 4 index bytes) per block. Lane i of a block
// holds value k + i, whose column is 4 * (i / 2) + its 2-bit field; the field is shifted out of the
// block's index dword (vpsrlvd), combined with the group base (vpternlogd) and picks the x of that
// column out of the block's two x vectors (vpermt2ps). Values and x past the row are masked off.
// R rows at once (q[i], irow[i]; sums[i][nb]): their x vectors are loaded once per step and their
// chains interleave; each row's operations and their order are those of R = 1 (the same bits).
template <int R, int NB>
inline void nm24_i8_rows_dot(const int8_t* const* q, const uint8_t* const* irow, int64_t vpr, const float* const* xs,
                             float (*sums)[NB]) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  auto positions = [&](uint32_t idx) {  // (field & 3) | base
    return _mm512_ternarylogic_epi32(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(idx)), shifts), three, base, 0xEA);
  };
  auto widen = [](__m128i raw) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)); };
  __m512 acc[R][NB][2];
  for (int i = 0; i < R; ++i)
    for (int nb = 0; nb < NB; ++nb) acc[i][nb][0] = acc[i][nb][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= vpr; k += 32) {
    __m512i p0[R], p1[R];
    __m512 w0[R], w1[R];
    for (int i = 0; i < R; ++i) {
      v512::prefetch(q[i] + k, v512::kPrefetchBytes);
      uint32_t i0, i1;
      std::memcpy(&i0, irow[i] + k / 4, 4);
      std::memcpy(&i1, irow[i] + k / 4 + 4, 4);
      p0[i] = positions(i0), p1[i] = positions(i1);
      w0[i] = widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[i] + k)));
      w1[i] = widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[i] + k + 16)));
    }
    for (int nb = 0; nb < NB; ++nb) {
      const float* x = xs[nb] + 2 * k;
      const __m512 xa = _mm512_loadu_ps(x), xb = _mm512_loadu_ps(x + 16);
      const __m512 xc = _mm512_loadu_ps(x + 32), xd = _mm512_loadu_ps(x + 48);
      for (int i = 0; i < R; ++i) {
        acc[i][nb][0] = _mm512_fmadd_ps(w0[i], _mm512_permutex2var_ps(xa, p0[i], xb), acc[i][nb][0]);
        acc[i][nb][1] = _mm512_fmadd_ps(w1[i], _mm512_permutex2var_ps(xc, p1[i], xd), acc[i][nb][1]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int64_t kk = k; kk < vpr; kk += 16) {
      const int64_t nv = min64(16, vpr - kk), nc = 2 * nv;
      uint32_t idx = 0;
      std::memcpy(&idx, irow[i] + kk / 4, static_cast<size_t>((nv + 3) / 4));
      const __m512i pos = positions(idx);
      const __mmask16 vm = v512::first_lanes(nv);
      const __m512 w = widen(_mm_maskz_loadu_epi8(vm, q[i] + kk));
      for (int nb = 0; nb < NB; ++nb) {
        const float* x = xs[nb] + 2 * kk;
        const __m512 lo = _mm512_maskz_loadu_ps(v512::first_lanes(nc), x);
        const __m512 hi = _mm512_maskz_loadu_ps(v512::first_lanes(nc > 16 ? nc - 16 : 0), x + 16);
        acc[i][nb][0] = _mm512_fmadd_ps(w, _mm512_maskz_permutex2var_ps(vm, lo, pos, hi), acc[i][nb][0]);
      }
    }
    for (int nb = 0; nb < NB; ++nb) sums[i][nb] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][nb][0], acc[i][nb][1]));
  }
}


#if defined(__AVX512VBMI2__)
// Bitmap rows with float32 x on CPUs with AVX512_VBMI2: 64 columns per step, the row's next values
// expand-loaded to the bytes their bitmap bits name (vpexpandb from memory reads exactly popcount
// bytes, so no load passes the buffer), widened and converted 16 at a time, FMA with x (masked past
// `cols`). Fewer shuffle-port instructions per column than the 16-column vpexpandd steps above.
// R rows at once (values from vp[i], bitmap rows bits[i]; sums[i][nb]): x loaded once per step for all
// of them, each row's operations in the order of R = 1 (the same bits).
template <int R, int NB>
inline void bitmap_i8_rows_dot_vbmi2(const int8_t* q, const int64_t* vp0, const uint8_t* const* bits, int64_t cols,
                                     const float* const* xs, float (*sums)[NB]) {
  __m512 acc[R][NB][4];
  for (int i = 0; i < R; ++i)
    for (int nb = 0; nb < NB; ++nb) acc[i][nb][0] = acc[i][nb][1] = acc[i][nb][2] = acc[i][nb][3] = _mm512_setzero_ps();
  auto widen = [](__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); };
  int64_t vp[R];
  for (int i = 0; i < R; ++i) vp[i] = vp0[i];
  int64_t c = 0;
  for (; c + 64 <= cols; c += 64) {
    __m512 w[R][4];
    for (int i = 0; i < R; ++i) {
      v512::prefetch(q + vp[i], v512::kPrefetchBytes);
      uint64_t m;
      std::memcpy(&m, bits[i] + c / 8, 8);
      const __m512i b = _mm512_maskz_expandloadu_epi8(m, q + vp[i]);
      vp[i] += _mm_popcnt_u64(m);
      w[i][0] = widen(_mm512_castsi512_si128(b)), w[i][1] = widen(_mm512_extracti32x4_epi32(b, 1));
      w[i][2] = widen(_mm512_extracti32x4_epi32(b, 2)), w[i][3] = widen(_mm512_extracti32x4_epi32(b, 3));
    }
    for (int nb = 0; nb < NB; ++nb) {
      const float* x = xs[nb] + c;
      const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
      const __m512 x2 = _mm512_loadu_ps(x + 32), x3 = _mm512_loadu_ps(x + 48);
      for (int i = 0; i < R; ++i) {
        acc[i][nb][0] = _mm512_fmadd_ps(w[i][0], x0, acc[i][nb][0]);
        acc[i][nb][1] = _mm512_fmadd_ps(w[i][1], x1, acc[i][nb][1]);
        acc[i][nb][2] = _mm512_fmadd_ps(w[i][2], x2, acc[i][nb][2]);
        acc[i][nb][3] = _mm512_fmadd_ps(w[i][3], x3, acc[i][nb][3]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    if (c < cols) {
      const int64_t nc = cols - c;
      uint64_t m = 0;
      std::memcpy(&m, bits[i] + c / 8, static_cast<size_t>((nc + 7) / 8));
      m = _bzhi_u64(m, static_cast<unsigned>(nc));
      const __m512i b = _mm512_maskz_expandloadu_epi8(m, q + vp[i]);
      const __m512 w[4] = {widen(_mm512_castsi512_si128(b)), widen(_mm512_extracti32x4_epi32(b, 1)),
                           widen(_mm512_extracti32x4_epi32(b, 2)), widen(_mm512_extracti32x4_epi32(b, 3))};
      for (int t = 0; t < 4 && 16 * t < nc; ++t) {
        const __mmask16 cm = v512::first_lanes(nc - 16 * t);
        for (int nb = 0; nb < NB; ++nb) acc[i][nb][t] = _mm512_fmadd_ps(w[t], _mm512_maskz_loadu_ps(cm, xs[nb] + c + 16 * t), acc[i][nb][t]);
      }
    }
    for (int nb = 0; nb < NB; ++nb) {
      sums[i][nb] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[i][nb][0], acc[i][nb][1]),
                                                       _mm512_add_ps(acc[i][nb][2], acc[i][nb][3])));
    }
  }
}
#endif

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

// 2:4 rows: each 8 int8 values (two index bytes, 16 columns) widened once to float32 and multiplied
// with the 8 x values at their columns (v256::nm24_x16), per batch row: no zero lanes, no masks.
// irow: the row's index bytes; q: its vpr = cols / 2 values.
template <int NB>
inline void nm24_i8_row_dot_x(const int8_t* q, const uint8_t* irow, int64_t cols, const float* const* xs, float* sums) {
  __m256 acc[NB][2];
  for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= cols; c += 32, q += 16) {
    v256::prefetch_l2(q, v256::kPrefetchBytes);
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8))));
    for (int nb = 0; nb < NB; ++nb) {
      acc[nb][0] = _mm256_fmadd_ps(w0, v256::nm24_x16(xs[nb] + c, irow + c / 8), acc[nb][0]);
      acc[nb][1] = _mm256_fmadd_ps(w1, v256::nm24_x16(xs[nb] + c + 16, irow + c / 8 + 2), acc[nb][1]);
    }
  }
  for (; c < cols; c += 8, q += 4) {  // 4 or 8 columns: 2 or 4 values
    const int64_t nc = min64(8, cols - c);
    int32_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = 0; k < nc / 2; ++k) v[k] = q[k];
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
    for (int nb = 0; nb < NB; ++nb) {
      const __m256 xv = _mm256_maskload_ps(xs[nb] + c, v256::first_lanes(nc));
      acc[nb][0] = _mm256_fmadd_ps(w0, _mm256_permutevar8x32_ps(xv, v256::nm24_pos(irow[c / 8])), acc[nb][0]);
    }
  }
  for (int nb = 0; nb < NB; ++nb) sums[nb] = v256::hsum(_mm256_add_ps(acc[nb][0], acc[nb][1]));
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

// y[b, r] = out(r, b, sum, bias[r]) for rows [r0, r1) and every batch row, NB batch rows at a time:
// row(r, xs, sums, nb) writes row r's sums (type S) against the NB x rows xs (x row b at x0 + b * ld).
template <class X, class S, class RowFn, class OutFn>
void rows_by_quads(const Problem& p, const X* x0, int64_t ld, int64_t r0, int64_t r1, RowFn&& row, OutFn&& out) {
  for_batch_quads(p.B, [&](auto nbc, int64_t b0) {
    constexpr int NB = decltype(nbc)::value;
    const X* xs[NB];
    for (int nb = 0; nb < NB; ++nb) xs[nb] = x0 + (b0 + nb) * ld;
    for (int64_t r = r0; r < r1; ++r) {
      S sums[NB];
      row(r, xs, sums, nbc);
      const float bv = p.bias ? p.bias[r] : 0.f;
      for (int nb = 0; nb < NB; ++nb) p.y[(b0 + nb) * p.out + r] = out(r, b0 + nb, sums[nb], bv);
    }
  });
}

// y[b, r] = scales[r] * (row r . x_b) + bias[r] for rows [r0, r1) and every batch row
template <class RowFn>
void i8_rows(const Problem& p, const float* scales, int64_t r0, int64_t r1, RowFn&& row) {
  rows_by_quads<float, float>(p, p.x, p.in, r0, r1, row,
                              [scales](int64_t r, int64_t, float sum, float bv) { return scales[r] * sum + bv; });
}

// As i8_rows, R rows per call while R remain (then one): group(r, rc, xs, sums, nbc) writes rows
// [r, r + rc) (rc an integral_constant) into sums[i][nb].
template <int R, class GroupFn>
void i8_row_groups(const Problem& p, const float* scales, int64_t r0, int64_t r1, GroupFn&& group) {
  for_batch_quads(p.B, [&](auto nbc, int64_t b0) {
    constexpr int NB = decltype(nbc)::value;
    const float* xs[NB];
    for (int nb = 0; nb < NB; ++nb) xs[nb] = p.x + (b0 + nb) * p.in;
    auto run = [&](int64_t r, auto rc) {
      constexpr int RC = decltype(rc)::value;
      float sums[RC][NB];
      group(r, rc, xs, sums, nbc);
      for (int i = 0; i < RC; ++i) {
        const float bv = p.bias ? p.bias[r + i] : 0.f;
        // one rounding whatever the compiler contracts: the same bits for every R
        for (int nb = 0; nb < NB; ++nb) p.y[(b0 + nb) * p.out + r + i] = std::fma(scales[r + i], sums[i][nb], bv);
      }
    };
    int64_t r = r0;
    for (; r + R <= r1; r += R) run(r, std::integral_constant<int, R>{});
    for (; r < r1; ++r) run(r, std::integral_constant<int, 1>{});
  });
}

// i8_row_groups with int8_rows_in_flight() rows per group (1 or 2)
template <class GroupFn>
void i8_rows_in_flight(const Problem& p, const float* scales, int64_t r0, int64_t r1, GroupFn&& group) {
  if (int8_rows_in_flight() >= 2) i8_row_groups<2>(p, scales, r0, r1, group);
  else i8_row_groups<1>(p, scales, r0, r1, group);
}

// Prefetch of the stored bytes of whole rows (bitmap row and int8 values) kRowsAhead rows ahead of
// the row being computed: the row kernels walk their rows in order, so the next rows' bitmap and
// values are requested while this one computes (the per-step value prefetch alone leaves the bitmap
// stream to the hardware). `value_lines` is a fixed count of 64-byte lines per row (the mean row plus
// slack): a count that varied per row would mispredict its loop exit. 75% sparse int8, 2 threads,
// weights cycled through 600 MB: 11264x2048 float32 x 0.725 -> 0.695 ms, 2048x5632 0.350 -> 0.343 ms;
// 4 to 16 rows ahead measured alike, 2 no better than none.
constexpr int64_t kRowsAhead = 8;
struct RowPrefetch {
  int64_t value_lines = 0;
  explicit RowPrefetch(const BitmapView& w) : value_lines(w.rows > 0 ? (w.nnz / w.rows + 63) / 64 + 1 : 0) {}
  void operator()(const BitmapView& w, int64_t r) const {
#if defined(__AVX2__)
    if (r + kRowsAhead >= w.rows) return;
    const int64_t ra = r + kRowsAhead;
    const char* b = reinterpret_cast<const char*>(w.bits + ra * w.bpr);
    for (int64_t o = 0; o < w.bpr; o += 64) _mm_prefetch(b + o, _MM_HINT_T0);
    const char* v = static_cast<const char*>(w.val) + w.row_offsets[ra];
    for (int64_t l = 0; l < value_lines; ++l) _mm_prefetch(v + 64 * l, _MM_HINT_T0);
#else
    (void)w, (void)r;
#endif
  }
};

void bitmap_i8_rows(const BitmapI8& wq, const Problem& p, int64_t r0, int64_t r1) {
  const BitmapView& w = wq.w;
  const int8_t* q = static_cast<const int8_t*>(w.val);
  const RowPrefetch prefetch_row(w);
#if defined(__AVX512VBMI2__)
  i8_rows_in_flight(p, wq.scales, r0, r1, [&](int64_t r, auto rc, const float* const* xs, auto sums, auto) {
    constexpr int RC = decltype(rc)::value;
    for (int i = 0; i < RC; ++i) prefetch_row(w, r + i);
    int64_t vp[RC];
    const uint8_t* rows[RC];
    for (int i = 0; i < RC; ++i) vp[i] = w.row_offsets[r + i], rows[i] = w.bits + (r + i) * w.bpr;
    bitmap_i8_rows_dot_vbmi2<RC>(q, vp, rows, w.cols, xs, sums);
  });
#else
  i8_rows(p, wq.scales, r0, r1, [&](int64_t r, const float* const* xs, float* sums, auto nbc) {
    prefetch_row(w, r);
    const uint8_t* row = w.bits + r * w.bpr;
    i8_row_dot<decltype(nbc)::value, 0>(q, w.row_offsets[r], w.nnz, w.cols, [row](int64_t i) { return row[i]; }, xs, sums);
  });
#endif
}

// Rows of an n:m weight other than 2:4 as bitmap rows (their values are stored in column order, as a
// bitmap row's): row(r) decodes row r's positions once and returns its bits (8 bytes of slack past the row).
class NmRowBits {
 public:
  explicit NmRowBits(const NmView& w)
      : w_(w), bits_(static_cast<size_t>((w.cols + 7) / 8 + 8)), cols_(static_cast<size_t>(w.vpr > 0 ? w.vpr : 1)) {}
  const uint8_t* row(int64_t r) {
    if (decoded_ != r) {
      std::memset(bits_.data(), 0, bits_.size());
      nm_decode_cols(w_, w_.idx + r * w_.ibpr, 0, w_.vpr, cols_.data());
      for (int64_t k = 0; k < w_.vpr; ++k) bits_[cols_[k] >> 3] |= static_cast<uint8_t>(1u << (cols_[k] & 7));
      decoded_ = r;
    }
    return bits_.data();
  }

 private:
  const NmView& w_;
  std::vector<uint8_t> bits_;
  std::vector<int32_t> cols_;
  int64_t decoded_ = -1;
};

void nm_i8_rows(const NmI8& wq, const Problem& p, int64_t r0, int64_t r1) {
  const NmView& w = wq.w;
  const int8_t* q = static_cast<const int8_t*>(w.val);
  const int64_t total = w.rows * w.vpr;
  if (w.n == 2 && w.m == 4) {  // each index byte is two groups: kNm24 gives their 8-column mask
#if defined(__AVX512F__)
    i8_rows_in_flight(p, wq.scales, r0, r1, [&](int64_t r, auto rc, const float* const* xs, auto sums, auto) {
      constexpr int RC = decltype(rc)::value;
      const int8_t* qs[RC];
      const uint8_t* irows[RC];
      for (int i = 0; i < RC; ++i) qs[i] = q + (r + i) * w.vpr, irows[i] = w.idx + (r + i) * w.ibpr;
      nm24_i8_rows_dot<RC>(qs, irows, w.vpr, xs, sums);
    });
    return;
#endif
    i8_rows(p, wq.scales, r0, r1, [&](int64_t r, const float* const* xs, float* sums, auto nbc) {
      const uint8_t* irow = w.idx + r * w.ibpr;
#if defined(__AVX2__) && !defined(__AVX512F__)
      (void)total;
      nm24_i8_row_dot_x<decltype(nbc)::value>(q + r * w.vpr, irow, w.cols, xs, sums);
#else
      i8_row_dot<decltype(nbc)::value, 4>(q, r * w.vpr, total, w.cols, [irow](int64_t i) { return kNm24.mask[irow[i]]; },
                                       xs, sums);
#endif
    });
    return;
  }
  // other n:m: the row's positions are decoded into a bitmap row first (values are in column order)
  NmRowBits bits(w);
  i8_rows(p, wq.scales, r0, r1, [&](int64_t r, const float* const* xs, float* sums, auto nbc) {
    const uint8_t* row = bits.row(r);
#if defined(__AVX512VBMI2__)
    const int64_t vp = r * w.vpr;
    bitmap_i8_rows_dot_vbmi2<1>(q, &vp, &row, w.cols, xs, reinterpret_cast<float(*)[decltype(nbc)::value]>(sums));
#else
    i8_row_dot<decltype(nbc)::value, 0>(q, r * w.vpr, total, w.cols, [row](int64_t i) { return row[i]; }, xs, sums);
#endif
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

// ---- I8Act::int8: x quantized per batch row, integer dot products ----

// max_j |x[j]| over [0, n) (the same in every path: a max)
inline float row_amax(const float* x, int64_t n) {
  float amax = 0.f;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
  amax = _mm512_reduce_max_ps(m);
#endif
  for (; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  return amax;
}

// q[0, n) = clamp(nearbyint(x * 127 / amax), +-127); returns amax / 127 (0 for an all-zero row).
// Exact in every path: amax is a max, and each element takes one multiply and one rounding.
float quantize_row(const float* x, int64_t n, int8_t* q) {
  const float amax = row_amax(x, n);
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; j + 16 <= n; j += 16) {  // round to nearest even (MXCSR default), saturate (|x * inv| <= 127 + rounding)
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtsepi32_epi8(v));
  }
#endif
  for (; j < n; ++j) q[j] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(x[j] * inv))));
  return amax / 127.f;
}

// limbs[k * ld + j] = byte k of X[j] in two's complement (planes 0 and 1 unsigned, plane 2 the signed top byte),
// X[j] = clamp(nearbyint(x[j] * inv), +-kFxMax), inv = kFxMax / amax (int8.h, the fixed-point walk); zeros in [n, ld). Returns amax / kFxMax, or -1 (nothing written) when
// 0 < amax < kFxMinAmax. Exact in every path: one float32 multiply and one rounding per element.
float fixed_row(const float* x, int64_t n, uint8_t* limbs, int64_t ld) {
  const float amax = row_amax(x, n);
  if (amax > 0.f && amax < kFxMinAmax) return -1.f;
  const float inv = amax > 0.f ? static_cast<float>(kFxMax) / amax : 0.f;
  uint8_t* l0 = limbs;
  uint8_t* l1 = limbs + ld;
  uint8_t* l2 = limbs + 2 * ld;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i lo = _mm512_set1_epi32(-kFxMax), hi = _mm512_set1_epi32(kFxMax);
  for (; j + 16 <= n; j += 16) {  // round to nearest even (MXCSR default) as nearbyint
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vinv));
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(l0 + j), _mm512_cvtepi32_epi8(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(l1 + j), _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(l2 + j), _mm512_cvtepi32_epi8(_mm512_srai_epi32(v, 16)));
  }
#endif
  for (; j < n; ++j) {
    const float r = std::nearbyint(x[j] * inv);
    const int32_t v = static_cast<int32_t>(std::max(-static_cast<float>(kFxMax), std::min(static_cast<float>(kFxMax), r)));
    const uint32_t u = static_cast<uint32_t>(v);  // two's complement bytes
    l0[j] = static_cast<uint8_t>(u), l1[j] = static_cast<uint8_t>(u >> 8), l2[j] = static_cast<uint8_t>(u >> 16);
  }
  for (int k = 0; k < kFxLimbs; ++k) std::memset(limbs + k * ld + n, 0, static_cast<size_t>(ld - n));
  return amax / static_cast<float>(kFxMax);
}

// y[b, r] = scales[r] * (sx[b] * float(dot)) + bias[r] for rows [r0, r1): dot(r, xq rows, sums, nb)
// writes the exact integer sums of row r against NB quantized x rows.
template <class DotFn>
void i8_rows_qx(const Problem& p, const QuantX& xq, const float* scales, int64_t r0, int64_t r1, DotFn&& dot) {
  rows_by_quads<int8_t, int64_t>(p, xq.q, xq.ld, r0, r1, dot, [&](int64_t r, int64_t b, int64_t sum, float bv) {
    return qx_output(scales[r], xq.scale[b], sum, bv);
  });
}

#if defined(__AVX2__)
// 256-bit pieces of the int8-activation kernels that every build with AVX2 compiles: the AVX2 kernels below
// use them, and the n:16 kernel runs on them in the AVX-512 VNNI build too (its bitmap walk would need each
// row's positions decoded into a bitmap row first). 32 int8 products per step, summed in int32 lanes by |q|
// (u8) times xq with q's sign (s8): one vpdpbusd ymm with AVX-VNNI or AVX512 VNNI + VL, else vpmaddubsw
// (pairs: at most 2 * 128 * 127 < 2^15, no saturation) and vpmaddwd by ones. Each lane gains at most
// 4 * 128 * 127 per step, so chunks of kQx256Chunk values are reduced into an int64 before a lane wraps.
constexpr int64_t kQx256Chunk = 65536;
inline void qx_prefetch(const int8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p) + 4096, _MM_HINT_T0); }

template <int NB>
struct Qx256Acc {
  __m256i acc[NB];
  int64_t total[NB] = {};
  Qx256Acc() { clear(); }
  void clear() {
    for (int nb = 0; nb < NB; ++nb) acc[nb] = _mm256_setzero_si256();
  }
  void add(__m256i w, int nb, __m256i xg) {
    const __m256i aw = _mm256_abs_epi8(w), sx = _mm256_sign_epi8(xg, w);
#if defined(__AVXVNNI__)
    acc[nb] = _mm256_dpbusd_avx_epi32(acc[nb], aw, sx);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    acc[nb] = _mm256_dpbusd_epi32(acc[nb], aw, sx);
#else
    acc[nb] = _mm256_add_epi32(acc[nb], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1)));
#endif
  }
  void flush() {
    for (int nb = 0; nb < NB; ++nb) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[nb]);
      for (int32_t v : lanes) total[nb] += v;
    }
    clear();
  }
};

// 32 bytes whose 16-byte halves are p[0, 16) and p[off, off + 16)
inline __m256i load_halves(const int8_t* p, int64_t off) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + off)), 1);
}

// An N:M row of vpr int8 values in steps of 32: step(a, k) adds values [k, k + 32) into a, tail(a, k, nv)
// the last nv < 32; the int32 lanes are reduced into int64 every kQx256Chunk values. sums[nb]: the totals.
template <int NB, class Step, class Tail>
inline void qx256_walk(int64_t vpr, int64_t* sums, Step&& step, Tail&& tail) {
  Qx256Acc<NB> a;
  for (int64_t c0 = 0; c0 < vpr; c0 += kQx256Chunk) {
    const int64_t c1 = min64(vpr, c0 + kQx256Chunk);
    int64_t k = c0;
    for (; k + 32 <= c1; k += 32) step(a, k);
    if (k < c1) tail(a, k, c1 - k);
    a.flush();
  }
  for (int nb = 0; nb < NB; ++nb) sums[nb] = a.total[nb];
}

// n:16 (n = 2, 4 or 8): the stored positions are nibbles, which are vpshufb controls as they are.
// 32 values (32 / n groups, 512 / n columns) per step. 128-bit lane L holds values [16L, 16L + 16),
// groups [L * 16 / n, (L + 1) * 16 / n); shuffle s of 16 / n gathers with the positions as control from
// the 16-column x chunks of group s (lane 0) and group s + 16 / n (lane 1) (load_halves), and a blend
// keeps its group s of each lane (dword s for 4:16, qword s for 8:16, word s for 2:16): the gathered x
// in the values' order.

// 16 index bytes as 32 positions: byte 2i = p[i] & 15, byte 2i + 1 = p[i] >> 4 (word i of the widened
// bytes ORed with itself shifted by 4 holds both nibbles in its two low nibbles)
inline __m256i nibble_positions(const uint8_t* p) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_or_si256(w, _mm256_slli_epi16(w, 4)), _mm256_set1_epi8(15));
}

template <int N, int S>
inline __m256i take_group(__m256i g, __m256i h) {  // g with group S of each lane taken from h
  if constexpr (N == 8) {
    return _mm256_blend_epi32(g, h, 0x33 << (2 * S));
  } else if constexpr (N == 4) {
    return _mm256_blend_epi32(g, h, 0x11 << S);
  } else {
    return _mm256_blend_epi16(g, h, 1 << S);
  }
}

// x (the step's window) gathered at the positions, groups [S, 16 / N) of each lane taken into g
template <int N, int S>
inline __m256i nm16_gather(__m256i g, const int8_t* x, __m256i pos) {
  if constexpr (S == 16 / N) {
    return g;
  } else {
    const __m256i h = _mm256_shuffle_epi8(load_halves(x + 16 * S, 256 / N), pos);
    return nm16_gather<N, S + 1>(S == 0 ? h : take_group<N, S>(g, h), x, pos);
  }
}

#define SF_INT8_QX_NM16 1
template <int N, int NB>
inline void nm16_qx_row_dot(const int8_t* q, const uint8_t* irow, int64_t vpr, const int8_t* const* xs, int64_t* sums) {
  static_assert(N == 2 || N == 4 || N == 8, "n:16 with n in {2, 4, 8}");
  constexpr int64_t kStepCols = 512 / N;
  qx256_walk<NB>(vpr, sums, [&](Qx256Acc<NB>& a, int64_t k) {
    qx_prefetch(q + k);
    const __m256i pos = nibble_positions(irow + k / 2);
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k));
    for (int nb = 0; nb < NB; ++nb) a.add(w, nb, nm16_gather<N, 0>(pos, xs[nb] + k / N * 16, pos));
  }, [&](Qx256Acc<NB>& a, int64_t k, int64_t nv) {  // whole groups: values, positions and x window copied, zeros above
    alignas(32) int8_t tail[32] = {};
    alignas(16) uint8_t idx[16] = {};
    alignas(32) int8_t xw[kStepCols] = {};
    std::memcpy(tail, q + k, static_cast<size_t>(nv));
    std::memcpy(idx, irow + k / 2, static_cast<size_t>((nv + 1) / 2));
    const __m256i pos = nibble_positions(idx);
    const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    for (int nb = 0; nb < NB; ++nb) {
      std::memcpy(xw, xs[nb] + k / N * 16, static_cast<size_t>(nv / N * 16));
      a.add(w, nb, nm16_gather<N, 0>(pos, xw, pos));
    }
  });
}

#endif  // __AVX2__

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512VBMI2__)
// Both kernels multiply (q + 128) as u8 by the gathered xq as s8 (vpdpbusd, 64 values a step) and
// subtract 128 * sum xq (a second vpdpbusd). The int32 lanes wrap, but the difference is the exact
// dot as long as it stays below 2^31 per chunk: |dot| <= 127 * 127 * values, so each chunk of at most
// kQxChunk values is reduced into an int64.
constexpr int64_t kQxChunk = 65536;

template <int NB>
struct QxAcc {
  __m512i acc[NB], cor[NB];
  int64_t total[NB] = {};
  QxAcc() { clear(); }
  void clear() {
    for (int nb = 0; nb < NB; ++nb) acc[nb] = cor[nb] = _mm512_setzero_si512();
  }
  void add(__m512i wu, int nb, __m512i xg) {
    acc[nb] = _mm512_dpbusd_epi32(acc[nb], wu, xg);
    cor[nb] = _mm512_dpbusd_epi32(cor[nb], _mm512_set1_epi8(static_cast<char>(0x80)), xg);
  }
  void flush() {
    for (int nb = 0; nb < NB; ++nb) total[nb] += _mm512_reduce_add_epi32(_mm512_sub_epi32(acc[nb], cor[nb]));
    clear();
  }
};

inline __m512i flip_sign(__m512i w) { return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80))); }

// 2:4: 64 values (128 columns from 2k, 16 index bytes) per step. Byte j of the control takes bits
// [2j, 2j + 8) of the index qword that holds value j's field (vpmultishiftqb: qwords 0-3 of the source
// are index qword 0, qwords 4-7 index qword 1); & 3 | 4 * (j / 2) is its column in the 128-byte window
// (vpermt2b over two x vectors).
struct Nm24QxControl {
  int8_t shift[64], base[64];
  constexpr Nm24QxControl() : shift(), base() {
    for (int j = 0; j < 64; ++j) {
      shift[j] = static_cast<int8_t>((2 * j) & 63);
      base[j] = static_cast<int8_t>(4 * (j / 2));
    }
  }
};
alignas(64) constexpr Nm24QxControl kNm24Qx{};

template <int NB>
inline void nm24_qx_row_dot(const int8_t* q, const uint8_t* irow, int64_t vpr, const int8_t* const* xs, int64_t* sums) {
  const __m512i shift = _mm512_load_si512(kNm24Qx.shift), base = _mm512_load_si512(kNm24Qx.base);
  const __m512i three = _mm512_set1_epi8(3);
  auto positions = [&](uint64_t i0, uint64_t i1) {
    const __m512i src = _mm512_mask_set1_epi64(_mm512_set1_epi64(static_cast<long long>(i0)), 0xF0, static_cast<long long>(i1));
    return _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(shift, src), three, base, 0xEA);
  };
  QxAcc<NB> a;
  for (int64_t c0 = 0; c0 < vpr; c0 += kQxChunk) {
    const int64_t c1 = min64(vpr, c0 + kQxChunk);
    int64_t k = c0;
    for (; k + 64 <= c1; k += 64) {
      v512::prefetch(q + k, v512::kPrefetchBytes);
      uint64_t i0, i1;
      std::memcpy(&i0, irow + k / 4, 8);
      std::memcpy(&i1, irow + k / 4 + 8, 8);
      const __m512i pos = positions(i0, i1);
      const __m512i wu = flip_sign(_mm512_loadu_si512(q + k));
      for (int nb = 0; nb < NB; ++nb) {
        const int8_t* x = xs[nb] + 2 * k;
        a.add(wu, nb, _mm512_permutex2var_epi8(_mm512_loadu_si512(x), pos, _mm512_loadu_si512(x + 64)));
      }
    }
    if (k < c1) {  // the last nv < 64 values: index bytes copied, values and gathered x masked (x is padded)
      const int64_t nv = c1 - k;
      uint64_t i[2] = {0, 0};
      std::memcpy(i, irow + k / 4, static_cast<size_t>((nv + 3) / 4));
      const __m512i pos = positions(i[0], i[1]);
      const __mmask64 vm = _bzhi_u64(~uint64_t{0}, static_cast<unsigned>(nv));
      const __m512i wu = flip_sign(_mm512_maskz_loadu_epi8(vm, q + k));
      for (int nb = 0; nb < NB; ++nb) {
        const int8_t* x = xs[nb] + 2 * k;
        a.add(wu, nb, _mm512_maskz_permutex2var_epi8(vm, _mm512_loadu_si512(x), pos, _mm512_loadu_si512(x + 64)));
      }
    }
    a.flush();
  }
  for (int nb = 0; nb < NB; ++nb) sums[nb] = a.total[nb];
}

// bitmap: 64 columns per step; the xq of the kept columns are packed to the front (vpcompressb by
// the 64-bit bitmap word, zero above) to meet the row's next values, whose count is the popcount.
// Two accumulator sets take turns by step (unrolled by two), so consecutive steps' vpdpbusd do not
// wait on each other.
template <int NB>
inline void bitmap_qx_row_dot(const int8_t* q, int64_t vp, int64_t end, const uint8_t* bits, int64_t cols,
                              const int8_t* const* xs, int64_t* sums) {
  QxAcc<NB> a0, a1;
  auto step = [&](QxAcc<NB>& a, int64_t c, int64_t c1) {
    v512::prefetch(q + vp, v512::kPrefetchBytes);
    uint64_t m = 0;
    if (c + 64 <= c1) {
      std::memcpy(&m, bits + c / 8, 8);
    } else {
      std::memcpy(&m, bits + c / 8, static_cast<size_t>((c1 - c + 7) / 8));
      m = _bzhi_u64(m, static_cast<unsigned>(c1 - c));
    }
    const int64_t n = _mm_popcnt_u64(m);
    const __m512i w = vp + 64 <= end ? _mm512_loadu_si512(q + vp)
                                     : _mm512_maskz_loadu_epi8(_bzhi_u64(~uint64_t{0}, static_cast<unsigned>(n)), q + vp);
    const __m512i wu = flip_sign(w);
    for (int nb = 0; nb < NB; ++nb) a.add(wu, nb, _mm512_maskz_compress_epi8(m, _mm512_loadu_si512(xs[nb] + c)));
    vp += n;
  };
  for (int64_t c0 = 0; c0 < cols; c0 += kQxChunk) {
    const int64_t c1 = min64(cols, c0 + kQxChunk);
    int64_t c = c0;
    for (; c + 128 <= c1; c += 128) {
      step(a0, c, c1);
      step(a1, c + 64, c1);
    }
    for (; c < c1; c += 64) step(a0, c, c1);
    a0.flush();
    a1.flush();
  }
  for (int nb = 0; nb < NB; ++nb) sums[nb] = a0.total[nb] + a1.total[nb];
}
// ---- the float32 mode's fixed-point walk (int8.h FixedX): vpdpbusd of the x limb bytes by the values.
// Planes 0 and 1 (unsigned bytes) multiply the values (s8) as they are; the signed top plane (s8) multiplies
// the values flipped to q + 128 (u8: a pruned column's 0 becomes 128), so that plane's sum carries
// 128 * (sum of the top bytes over every column), a per-call constant the output subtracts (FixedX::top_sum).
// Two accumulator sets take turns by step (the vpdpbusd latency is longer than a step); each vpdpbusd adds
// at most 4 * 255 * 128 to a lane, so the int32 lanes are reduced into an int64 every kFxChunkSteps steps
// (at most kFxChunkSteps / 2 + 1 per set: the two sets' sum stays below 2^31).
constexpr int64_t kFxChunkSteps = 8192;

// The int32 lanes of the accumulator sets (acc[set][nb][limb]) summed in int64, limbs weighted by 256^k:
// sets added first (each set takes at most half a chunk's steps: no lane wraps), then widened.
template <int NB>
inline void fx_flush(__m512i (&acc)[2][NB][kFxLimbs], int64_t* total) {
  for (int nb = 0; nb < NB; ++nb) {
    __m512i t = _mm512_setzero_si512();
    for (int k = 0; k < kFxLimbs; ++k) {
      const __m512i v = _mm512_add_epi32(acc[0][nb][k], acc[1][nb][k]);
      const __m512i w = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                         _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
      t = _mm512_add_epi64(t, _mm512_slli_epi64(w, 8 * k));
      acc[0][nb][k] = acc[1][nb][k] = _mm512_setzero_si512();
    }
    total[nb] += _mm512_reduce_add_epi64(t);
  }
}

// acc + u8 a times s8 b, four byte products per int32 lane (vpdpbusd). With GCC / Clang as inline assembly:
// GCC's intrinsic gives every accumulator of the one-row walk below a register copy per instruction.
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
#if defined(__GNUC__)
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, a, b);
#endif
}

// (l0, l1, top) += the three limb products of one 64-column step (fx_step)
inline void fx_limbs(__m512i& l0, __m512i& l1, __m512i& top, __m512i w, const uint8_t* x, int64_t ld) {
  l0 = dpbusd(l0, _mm512_loadu_si512(x), w);
  l1 = dpbusd(l1, _mm512_loadu_si512(x + ld), w);
  top = dpbusd(top, flip_sign(w), _mm512_loadu_si512(x + 2 * ld));
}

// acc += the three limb products of one 64-column step: w (s8 values expanded to their columns, zeros
// elsewhere) by limb planes 0 and 1 at x, and w + 128 by the signed top plane
inline void fx_step(__m512i (&acc)[kFxLimbs], __m512i w, const uint8_t* x, int64_t ld) {
  fx_limbs(acc[0], acc[1], acc[2], w, x, ld);
}

// The bitmap walk's next two 64-column steps from column c: the row's values expand-loaded to the bytes
// their bitmap bits name (zeros elsewhere; vpexpandb reads exactly popcount bytes), vp advanced past them.
inline void fx_expand2(const int8_t* q, int64_t& vp, const uint8_t* bits, int64_t c, __m512i& w0, __m512i& w1) {
  v512::prefetch(q + vp, v512::kPrefetchBytes);
  uint64_t m0, m1;
  std::memcpy(&m0, bits + c / 8, 8);
  std::memcpy(&m1, bits + c / 8 + 8, 8);
  const int64_t p0 = _mm_popcnt_u64(m0);
  w0 = _mm512_maskz_expandloadu_epi8(m0, q + vp);
  w1 = _mm512_maskz_expandloadu_epi8(m1, q + vp + p0);
  vp += p0 + _mm_popcnt_u64(m1);
}

// The same for one step of at most 64 columns [c, min(c + 64, c1)): bitmap bits at or past c1 ignored.
inline __m512i fx_expand_tail(const int8_t* q, int64_t& vp, const uint8_t* bits, int64_t c, int64_t c1) {
  uint64_t m = 0;
  std::memcpy(&m, bits + c / 8, static_cast<size_t>(min64(8, (c1 - c + 7) / 8)));
  if (c + 64 > c1) m = _bzhi_u64(m, static_cast<unsigned>(c1 - c));
  const __m512i w = _mm512_maskz_expandloadu_epi8(m, q + vp);
  vp += _mm_popcnt_u64(m);
  return w;
}

// bitmap_fx_row_dot for one batch row, its six accumulators named so that they stay in registers (the
// array form keeps them in memory across the step loop): the same steps, sums and chunks.
inline int64_t bitmap_fx_row_dot1(const int8_t* q, int64_t vp, const uint8_t* bits, int64_t cols, const uint8_t* x,
                                  int64_t ld) {
  int64_t total = 0;
  for (int64_t c0 = 0; c0 < cols; c0 += 64 * kFxChunkSteps) {
    const int64_t c1 = min64(cols, c0 + 64 * kFxChunkSteps);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0;
    int64_t c = c0;
    for (; c + 128 <= c1; c += 128) {
      __m512i w0, w1;
      fx_expand2(q, vp, bits, c, w0, w1);
      fx_limbs(a0, a1, a2, w0, x + c, ld);
      fx_limbs(b0, b1, b2, w1, x + c + 64, ld);
    }
    for (; c < c1; c += 64) {  // the last 64 or fewer columns of the chunk
      const __m512i w = fx_expand_tail(q, vp, bits, c, c1);
      fx_limbs(a0, a1, a2, w, x + c, ld);
    }
    __m512i acc[2][1][kFxLimbs] = {{{a0, a1, a2}}, {{b0, b1, b2}}};
    fx_flush<1>(acc, &total);
  }
  return total;
}

// bitmap: 64 columns per step; the row's next values expand-loaded to the bytes their bitmap bits name
// (zeros elsewhere; vpexpandb reads exactly popcount bytes), times the three limb planes of x at those
// columns. xs[nb] is batch row nb's limb plane 0 (plane k at + k * ld). Steps alternate between the two
// accumulator sets (one batch row: bitmap_fx_row_dot1). sums[nb] = sum_j q[j] * X[j] + 2^23 * top_sum[nb]
// (i8_rows_fx subtracts the constant).
template <int NB>
inline void bitmap_fx_row_dot(const int8_t* q, int64_t vp, const uint8_t* bits, int64_t cols, const uint8_t* const* xs,
                              int64_t ld, int64_t* sums) {
  if constexpr (NB == 1) {
    sums[0] = bitmap_fx_row_dot1(q, vp, bits, cols, xs[0], ld);
    return;
  }
  __m512i acc[2][NB][kFxLimbs];
  for (int s = 0; s < 2; ++s)
    for (int nb = 0; nb < NB; ++nb)
      for (int k = 0; k < kFxLimbs; ++k) acc[s][nb][k] = _mm512_setzero_si512();
  int64_t total[NB] = {};
  for (int64_t c0 = 0; c0 < cols; c0 += 64 * kFxChunkSteps) {
    const int64_t c1 = min64(cols, c0 + 64 * kFxChunkSteps);
    int64_t c = c0;
    for (; c + 128 <= c1; c += 128) {
      __m512i w0, w1;
      fx_expand2(q, vp, bits, c, w0, w1);
      for (int nb = 0; nb < NB; ++nb) {
        fx_step(acc[0][nb], w0, xs[nb] + c, ld);
        fx_step(acc[1][nb], w1, xs[nb] + c + 64, ld);
      }
    }
    for (; c < c1; c += 64) {  // the last 64 or fewer columns of the chunk
      const __m512i w = fx_expand_tail(q, vp, bits, c, c1);
      for (int nb = 0; nb < NB; ++nb) fx_step(acc[0][nb], w, xs[nb] + c, ld);
    }
    fx_flush<NB>(acc, total);
  }
  for (int nb = 0; nb < NB; ++nb) sums[nb] = total[nb];
}

#define SF_INT8_FX_KERNELS 1
#define SF_INT8_QX_KERNELS 1

#elif defined(__AVX2__)
// AVX2 (also the avx512 table without VNNI / VBMI / VBMI2): 32 int8 products per step in Qx256Acc.
constexpr int64_t kQxChunk = kQx256Chunk;
template <int NB>
using QxAcc = Qx256Acc<NB>;

// 2:4: 32 values (64 columns from 2k, 8 index bytes) per step. Index byte t holds the 2-bit fields of
// values 4t..4t+3: widened to dword t and ORed with itself shifted by 6, 12 and 18, byte j of that dword
// holds field j in its low two bits. Value p's column within its 16-column quarter of the window is
// 4 * ((p % 8) / 2) + field; vpshufb (per 128-bit lane) picks it from x[0, 16) | x[32, 48) for bytes
// 0-7 of each lane and from x[16, 32) | x[48, 64) for bytes 8-15, which leaves the gathered x in the
// values' order.
template <int NB>
inline void nm24_qx_row_dot(const int8_t* q, const uint8_t* irow, int64_t vpr, const int8_t* const* xs, int64_t* sums) {
  const __m256i base = _mm256_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12,
                                        0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i keep_lo = _mm256_setr_epi64x(0, -1, 0, -1);  // ORed into a control: bytes 8-15 of each lane zeroed
  const __m256i keep_hi = _mm256_setr_epi64x(-1, 0, -1, 0);  // bytes 0-7 zeroed
  const __m256i three = _mm256_set1_epi8(3);
  auto control = [&](uint64_t idx) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(idx)));
    const __m256i f = _mm256_or_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 6)),
                                      _mm256_or_si256(_mm256_slli_epi32(v, 12), _mm256_slli_epi32(v, 18)));
    return _mm256_add_epi8(_mm256_and_si256(f, three), base);
  };
  auto gather = [&](const int8_t* x, __m256i ctl) {  // x: the 64-column window
    const __m256i a = _mm256_shuffle_epi8(load_halves(x, 32), _mm256_or_si256(ctl, keep_lo));
    const __m256i b = _mm256_shuffle_epi8(load_halves(x + 16, 32), _mm256_or_si256(ctl, keep_hi));
    return _mm256_or_si256(a, b);
  };
  qx256_walk<NB>(vpr, sums, [&](QxAcc<NB>& a, int64_t k) {
    qx_prefetch(q + k);
    uint64_t idx;
    std::memcpy(&idx, irow + k / 4, 8);
    const __m256i ctl = control(idx);
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k));
    for (int nb = 0; nb < NB; ++nb) a.add(w, nb, gather(xs[nb] + 2 * k, ctl));
  }, [&](QxAcc<NB>& a, int64_t k, int64_t nv) {  // copied with zeros above (x is padded past the row)
    uint64_t idx = 0;
    std::memcpy(&idx, irow + k / 4, static_cast<size_t>((nv + 3) / 4));
    alignas(32) int8_t tail[32] = {};
    std::memcpy(tail, q + k, static_cast<size_t>(nv));
    const __m256i ctl = control(idx);
    const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    for (int nb = 0; nb < NB; ++nb) a.add(w, nb, gather(xs[nb] + 2 * k, ctl));
  });
}

// vpshufb controls that expand bytes [k, k + popcount(m)) to the positions of m's set bits (0x80, which
// zeroes, elsewhere): ctl[k][m], one qword per mask byte and offset k (the second byte of a 16-byte
// half starts at the first byte's popcount)
struct Expand8Table {
  uint64_t ctl[9][256];
  constexpr Expand8Table() : ctl() {
    for (int k = 0; k <= 8; ++k) {
      for (int m = 0; m < 256; ++m) {
        uint64_t c = 0;
        int rank = k;
        for (int j = 0; j < 8; ++j) c |= uint64_t{((m >> j) & 1) ? static_cast<uint64_t>(rank++) : 0x80u} << (8 * j);
        ctl[k][m] = c;
      }
    }
  }
};
constexpr Expand8Table kExpand8{};

// the 16-byte control of one 16-column half: mask bytes lo and hi, hi's values after lo's
inline __m128i expand16_control(uint32_t lo, uint32_t hi) {
  const __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kExpand8.ctl[0][lo]));
  const double* b = reinterpret_cast<const double*>(&kExpand8.ctl[_mm_popcnt_u32(lo)][hi]);
  return _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(a), b));
}

// bitmap: 32 columns per step. The row's next values are expanded to their columns (vpshufb per
// 16-column half, from 16 bytes loaded at that half's first value) and multiplied with x as stored.
template <int NB>
inline void bitmap_qx_row_dot(const int8_t* q, int64_t vp, int64_t end, const uint8_t* bits, int64_t cols,
                              const int8_t* const* xs, int64_t* sums) {
  QxAcc<NB> a;
  for (int64_t c0 = 0; c0 < cols; c0 += kQxChunk) {
    const int64_t c1 = min64(cols, c0 + kQxChunk);
    for (int64_t c = c0; c < c1; c += 32) {
      qx_prefetch(q + vp);
      uint32_t m = 0;
      if (c + 32 <= c1) {
        std::memcpy(&m, bits + c / 8, 4);
      } else {
        std::memcpy(&m, bits + c / 8, static_cast<size_t>((c1 - c + 7) / 8));
        m = _bzhi_u32(m, static_cast<unsigned>(c1 - c));
      }
      const uint32_t m0 = m & 0xff, m1 = (m >> 8) & 0xff, m2 = (m >> 16) & 0xff, m3 = m >> 24;
      const int64_t p01 = _mm_popcnt_u32(m & 0xffff), n = _mm_popcnt_u32(m);
      __m256i raw;
      if (vp + p01 + 16 <= end) {
        raw = load_halves(q + vp, p01);
      } else {  // near the end of the values: copied, so no load passes the buffer
        alignas(32) int8_t tmp[32] = {};
        std::memcpy(tmp, q + vp, static_cast<size_t>(p01));
        std::memcpy(tmp + 16, q + vp + p01, static_cast<size_t>(n - p01));
        raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
      }
      const __m256i ctl = _mm256_inserti128_si256(_mm256_castsi128_si256(expand16_control(m0, m1)),
                                                  expand16_control(m2, m3), 1);
      const __m256i w = _mm256_shuffle_epi8(raw, ctl);
      for (int nb = 0; nb < NB; ++nb) a.add(w, nb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[nb] + c)));
      vp += n;
    }
    a.flush();
  }
  for (int nb = 0; nb < NB; ++nb) sums[nb] = a.total[nb];
}
#define SF_INT8_QX_KERNELS 1
#endif

// The portable integer sums: every stored entry (column j, value index k) that for_stored(f) visits,
// q[k] * xs[nb][j] for NB quantized x rows.
template <int NB, class ForStored>
inline void qx_row_dot_portable(const int8_t* q, const int8_t* const* xs, int64_t* sums, ForStored&& for_stored) {
  for (int nb = 0; nb < NB; ++nb) sums[nb] = 0;
  for_stored([&](int64_t j, int64_t k) {
    for (int nb = 0; nb < NB; ++nb) sums[nb] += int64_t{q[k]} * xs[nb][j];
  });
}

void bitmap_i8_rows_qx(const BitmapI8& wq, const QuantX& xq, const Problem& p, int64_t r0, int64_t r1) {
  const BitmapView& w = wq.w;
  const int8_t* q = static_cast<const int8_t*>(w.val);
  const RowPrefetch prefetch_row(w);
  i8_rows_qx(p, xq, wq.scales, r0, r1, [&](int64_t r, const int8_t* const* xs, int64_t* sums, auto nbc) {
    constexpr int NB = decltype(nbc)::value;
    prefetch_row(w, r);
#if defined(SF_INT8_QX_KERNELS)
    bitmap_qx_row_dot<NB>(q, w.row_offsets[r], w.nnz, w.bits + r * w.bpr, w.cols, xs, sums);
#else
    qx_row_dot_portable<NB>(q, xs, sums, [&](auto&& f) { bitmap_stored(w, r, f); });
#endif
  });
}

void nm_i8_rows_qx(const NmI8& wq, const QuantX& xq, const Problem& p, int64_t r0, int64_t r1) {
  const NmView& w = wq.w;
  const int8_t* q = static_cast<const int8_t*>(w.val);
  NmRowBits bits(w);
  i8_rows_qx(p, xq, wq.scales, r0, r1, [&](int64_t r, const int8_t* const* xs, int64_t* sums, auto nbc) {
    constexpr int NB = decltype(nbc)::value;
#if defined(SF_INT8_QX_KERNELS)
    const int8_t* qr = q + r * w.vpr;
    const uint8_t* ir = w.idx + r * w.ibpr;
    if (w.n == 2 && w.m == 4) {
      nm24_qx_row_dot<NB>(qr, ir, w.vpr, xs, sums);
#if defined(SF_INT8_QX_NM16)  // n:16: the nibbles are the gather's controls (every build with AVX2)
    } else if (w.m == 16 && w.n == 4) {
      nm16_qx_row_dot<4, NB>(qr, ir, w.vpr, xs, sums);
    } else if (w.m == 16 && w.n == 2) {
      nm16_qx_row_dot<2, NB>(qr, ir, w.vpr, xs, sums);
    } else if (w.m == 16 && w.n == 8) {
      nm16_qx_row_dot<8, NB>(qr, ir, w.vpr, xs, sums);
#endif
    } else {  // other n:m: the bitmap kernel on the row's decoded positions
      bitmap_qx_row_dot<NB>(q, r * w.vpr, w.rows * w.vpr, bits.row(r), w.cols, xs, sums);
    }
#else
    qx_row_dot_portable<NB>(q, xs, sums, [&](auto&& f) { nm_stored(w, r, f); });
#endif
  });
}

#if defined(SF_INT8_FX_KERNELS)
// y[b, r] = fx_output(scales[r], sx[b], dot, bias[r]) for rows [r0, r1): dot(r, limb planes, sums, nb)
template <class DotFn>
void i8_rows_fx(const Problem& p, const FixedX& fx, const float* scales, int64_t r0, int64_t r1, DotFn&& dot) {
  rows_by_quads<uint8_t, int64_t>(p, fx.limbs, kFxLimbs * fx.ld, r0, r1, dot, [&](int64_t r, int64_t b, int64_t sum, float bv) {
    return fx_output(scales[r], fx.scale[b], sum - (int64_t{128} << 16) * fx.top_sum[b], bv);
  });
}

void bitmap_i8_rows_fx(const BitmapI8& wq, const FixedX& fx, const Problem& p, int64_t r0, int64_t r1) {
  const BitmapView& w = wq.w;
  const int8_t* q = static_cast<const int8_t*>(w.val);
  const RowPrefetch prefetch_row(w);
  i8_rows_fx(p, fx, wq.scales, r0, r1, [&](int64_t r, const uint8_t* const* xs, int64_t* sums, auto nbc) {
    prefetch_row(w, r);
    bitmap_fx_row_dot<decltype(nbc)::value>(q, w.row_offsets[r], w.bits + r * w.bpr, w.cols, xs, fx.ld, sums);
  });
}

void nm_i8_rows_fx(const NmI8& wq, const FixedX& fx, const Problem& p, int64_t r0, int64_t r1) {
  const NmView& w = wq.w;
  const int8_t* q = static_cast<const int8_t*>(w.val);
  NmRowBits bits(w);  // n:m other than 2:4 (int8_float_walk): the bitmap walk on the row's decoded positions
  i8_rows_fx(p, fx, wq.scales, r0, r1, [&](int64_t r, const uint8_t* const* xs, int64_t* sums, auto nbc) {
    bitmap_fx_row_dot<decltype(nbc)::value>(q, r * w.vpr, bits.row(r), w.cols, xs, fx.ld, sums);
  });
}
constexpr auto kBitmapRowsFx = bitmap_i8_rows_fx;
constexpr auto kNmRowsFx = nm_i8_rows_fx;
#else
constexpr void (*kBitmapRowsFx)(const BitmapI8&, const FixedX&, const Problem&, int64_t, int64_t) = nullptr;
constexpr void (*kNmRowsFx)(const NmI8&, const FixedX&, const Problem&, int64_t, int64_t) = nullptr;
#endif

constexpr I8Kernels kI8Kernels = {bitmap_i8_rows, nm_i8_rows,   csr_i8_rows, quantize_row, bitmap_i8_rows_qx,
                                  nm_i8_rows_qx,  fixed_row,    kBitmapRowsFx, kNmRowsFx};

}  // namespace
}  // namespace sf
