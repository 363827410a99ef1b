// N:M kernels, AVX2 + FMA. 2:4: each index byte is the 8-column keep-mask of two groups (lookup
// table) and decodes like a bitmap byte; other n:m: decode positions to columns, then gather x.
#include "lanes.h"
#include "sddmm.h"
#include "nm.h"
#include "simd_avx2.h"

namespace sf {
namespace avx2 {
namespace {

template <VT V, int NB>
void rows24_nb(const NmView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
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
      const __m256 w0 = v256::expand8<V>(w.val, vp, kNm24.mask[irow[c / 8]], total);
      const __m256 w1 = v256::expand8<V>(w.val, vp + 4, kNm24.mask[irow[c / 8 + 1]], total);
      for (int nb = 0; nb < NB; ++nb) {
        acc[nb][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[nb] + c), acc[nb][0]);
        acc[nb][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs[nb] + c + 8), acc[nb][1]);
      }
    }
    for (; c < cols; c += 8) {
      const int64_t nc = min64(8, cols - c);  // 4 or 8
      const unsigned m = kNm24.mask[irow[c / 8]] & ((1u << nc) - 1u);
      const __m256 w0 = v256::expand8<V>(w.val, vp, m, total);
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
void rows_any_nb(const NmView& w, const Problem& p, int64_t r0, int64_t r1, int64_t b0) {
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

template <VT V>
void rows_v(const NmView& w, const Problem& p, int64_t r0, int64_t r1) {
  const bool is24 = w.n == 2 && w.m == 4;
  for (int64_t b0 = 0; b0 < p.B; b0 += 4) {
    switch (min64(4, p.B - b0)) {
      case 1: is24 ? rows24_nb<V, 1>(w, p, r0, r1, b0) : rows_any_nb<V, 1>(w, p, r0, r1, b0); break;
      case 2: is24 ? rows24_nb<V, 2>(w, p, r0, r1, b0) : rows_any_nb<V, 2>(w, p, r0, r1, b0); break;
      case 3: is24 ? rows24_nb<V, 3>(w, p, r0, r1, b0) : rows_any_nb<V, 3>(w, p, r0, r1, b0); break;
      default: is24 ? rows24_nb<V, 4>(w, p, r0, r1, b0) : rows_any_nb<V, 4>(w, p, r0, r1, b0); break;
    }
  }
}

void rows(const NmView& w, const Problem& p, int64_t r0, int64_t r1) {
  if (w.vt == VT::f32) rows_v<VT::f32>(w, p, r0, r1); else rows_v<VT::bf16>(w, p, r0, r1);
}

void lanes(const NmView& w, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) {
  with_nm_dec(w, [&](const auto& dec) { lanes_rows(dec, p, lp, r0, r1, ybuf); });
}

void lanes_t(const NmView& w, const ProblemT& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* dxt) {
  with_nm_dec(w, [&](const auto& dec) { lanes_t_rows(dec, p, lp, r0, r1, dxt); });
}

void sddmm(const NmView& w, const ProblemW& p, const LanesPlan& xp, const LanesPlan& dp, int64_t r0, int64_t r1) {
  with_nm_dec(w, [&](const auto& dec) {
    sddmm_rows(dec, [&](int64_t r) -> int64_t { return r * w.vpr; }, p, xp, dp, r0, r1);
  });
}

}  // namespace

extern const NmKernels nm = {rows, lanes, lanes_t, sddmm};

}  // namespace avx2
}  // namespace sf
