// One bf16-compute prefill-attention tile (prefill_attention.h, PrefillBf16Tile), written once over a
// `Micro` that multiplies bf16 pairs: prefill_attention_avx512bf16.cpp (vdpbf16ps) and
// prefill_attention_amx.cpp (AMX TDPBF16PS) each include this header and define their Micro.
// Compiled only with AVX-512 + AVX512_BF16. Internal linkage throughout.
//
// Micro::gemm(A, lda, B, ldb, C, ldc, rows, cols, kpairs, add):
//   C[0:rows, 0:cols] (+)= A[0:rows, 0:2 kpairs] B, float32 C (row stride ldc floats), bf16 A (row
//   stride lda elements), B as pairs: dword (k, c) at B[k * ldb + c] = (B[2k, c], B[2k + 1, c]);
//   cols a multiple of 16, kpairs a multiple of 16; AMX also writes C rows up to rows rounded up to 16
//   (from A rows that exist there: the tile layouts of prefill_attention.h allocate them).
// Per group of kPrefillBf16Group query rows: S = Qb Kp[:, c0:c1] (Micro), the online softmax of the
// group's rows in float32 (scores masked to the rows' spans, running max / sum, accumulator rows
// rescaled, probabilities rounded to bf16 into pb), then acc += pb[:, c0:c1] Vp (Micro).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "prefill_attention.h"

namespace sf {
namespace {

// 2^t for 16 lanes, t <= 0, accurate to ~5e-5 relative (the probabilities are rounded to bf16, 2^-9,
// afterwards): t = n + f, |f| <= 1/2, a degree-4 polynomial for 2^f, scaled by 2^n (vscalefps);
// exactly 0 below -126 (and for -inf); NaN stays NaN.
inline __m512 exp2_bf16(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.6181291e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __mmask16 live = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);  // not below -126, or NaN
  return _mm512_maskz_scalef_ps(live, p, n);
}

// the group's rows [g0, g0 + gr): mask the scores s[r, c0:c1] to the rows' spans, update m, l (of
// the scaled scores; m is kept unscaled, t.scale > 0) and the accumulator rows, write the
// probabilities exp(scale (s - m)) as bf16 to pb[r, c0:c1]
inline void softmax_group(const PrefillBf16Tile& t, float* s, int64_t g0, int64_t gr) {
  constexpr int64_t W = kPrefillBlock;
  constexpr float kLog2e = 1.44269504088896341f;
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m512 vninf = _mm512_set1_ps(ninf);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const float c = t.scale * kLog2e;  // exp(scale x) = 2^(c x)
  const __m512 vc = _mm512_set1_ps(c);
  const int64_t c0 = t.c0, c1 = t.c1;
  for (int64_t r = 0; r < gr; ++r) {
    const int64_t row = g0 + r;
    float* sr = s + r * W;
    uint16_t* pr = t.pb + r * W;
    __m512 bmv = vninf;
    if (t.span) {
      const int32_t* sp = t.span + 4 * row;
      const __m512i a0 = _mm512_set1_epi32(sp[0]), a1 = _mm512_set1_epi32(sp[1]);
      const __m512i a2 = _mm512_set1_epi32(sp[2]), a3 = _mm512_set1_epi32(sp[3]);
      for (int64_t j = c0; j < c1; j += 16) {
        const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)), iota);
        const __mmask16 keep = (_mm512_cmpge_epi32_mask(col, a0) & _mm512_cmplt_epi32_mask(col, a1)) |
                               (_mm512_cmpge_epi32_mask(col, a2) & _mm512_cmplt_epi32_mask(col, a3));
        const __m512 x = _mm512_mask_loadu_ps(vninf, keep, sr + j);
        _mm512_storeu_ps(sr + j, x);
        bmv = _mm512_max_ps(x, bmv);  // a NaN score is skipped here and propagates through exp below
      }
    } else {
      for (int64_t j = c0; j < c1; j += 16) bmv = _mm512_max_ps(_mm512_loadu_ps(sr + j), bmv);
    }
    const float bm = _mm512_reduce_max_ps(bmv);
    const float m_new = t.m[row] > bm ? t.m[row] : bm;
    if (m_new == ninf) {  // nothing allowed in this row yet: no probability mass
      std::memset(pr + c0, 0, static_cast<size_t>(c1 - c0) * 2);
      continue;
    }
    const float corr = t.m[row] == ninf ? 0.f : std::exp2((t.m[row] - m_new) * c);
    const __m512 off = _mm512_set1_ps(-m_new * c);
    __m512 lsum = _mm512_setzero_ps();
    for (int64_t j = c0; j < c1; j += 16) {
      const __m512 p = exp2_bf16(_mm512_fmadd_ps(_mm512_loadu_ps(sr + j), vc, off));
      lsum = _mm512_add_ps(lsum, p);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(p)));
    }
    t.l[row] = t.l[row] * corr + _mm512_reduce_add_ps(lsum);
    t.m[row] = m_new;
    if (corr != 1.f) {
      float* ar = t.acc + row * t.Dv;
      const __m512 vcorr = _mm512_set1_ps(corr);
      for (int64_t d = 0; d < t.Dv; d += 16) _mm512_storeu_ps(ar + d, _mm512_mul_ps(_mm512_loadu_ps(ar + d), vcorr));
    }
  }
}

template <class Micro>
void prefill_tile_bf16_impl(const PrefillBf16Tile& t) {
  constexpr int64_t W = kPrefillBlock, G = kPrefillBf16Group;
  const Micro mu;
  const int64_t cols = t.c1 - t.c0;
  auto scores = [&](int64_t g0, float* s) {
    mu.gemm(t.qb + g0 * t.Dp, t.Dp, t.kp + t.c0, W, s + t.c0, W, min64(G, t.rows - g0), cols, t.Dp / 2, false);
  };
  // the scores of the next group are issued before the softmax of this one (two score buffers), so
  // the matrix unit works while the vector unit runs the softmax
  float* cur = t.s;
  float* next = t.s + G * W;
  scores(0, cur);
  for (int64_t g0 = 0; g0 < t.rows; g0 += G) {
    const int64_t gr = min64(G, t.rows - g0);
    if (g0 + G < t.rows) scores(g0 + G, next);
    softmax_group(t, cur, g0, gr);
    mu.gemm(t.pb + t.c0, W, t.vp + t.c0 / 2 * t.Dv, t.Dv, t.acc + g0 * t.Dv, t.Dv, gr, t.Dv, cols / 2, true);  // P V
    float* used = cur;
    cur = next;
    next = used;
  }
}

}  // namespace
}  // namespace sf
