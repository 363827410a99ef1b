// dW restricted to the mask (SDDMM), generic over the format decoders (CsrDec, BitmapDec, NmDec,
// FanInDec, BsrDec), compiled once per ISA file like lanes.h.
//
// x and dy are transposed into lanes tiles (LanesPlan: column j of tile t is 16..64 contiguous
// batch rows, zero-padded), so every stored entry q at (r, c) is a dot product of two contiguous
// vectors: dw[q] (+)= sum_b dyt[r][b] * xt[c][b]. The dy row stays in registers while the row's
// entries stream; one horizontal sum per entry and batch tile. Batches above 64 rows add the
// tiles' partial sums into dw (first tile writes, later ones add), so no pre-zeroing is needed and
// rows are independent (row blocks run on the pool without synchronisation).
//
// `first(r)` gives the value index of row r's first stored entry; the decoder yields the row's
// entries in value order. Everything has internal linkage.
#pragma once

#include "common.h"
#include "lanes.h"

namespace sf {
namespace {

// horizontal sum of a native vector, as a tree of halvings (a serial chain would cost ~kVL adds of latency)
inline float hsum_vfl(vfl a) {
#if defined(__AVX512F__)
  typedef float h8 __attribute__((vector_size(32)));
  h8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
#elif defined(__AVX__)
  vfl b = a;
#endif
#if defined(__AVX__)
  typedef float h4 __attribute__((vector_size(16)));
  h4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
#else
  vfl c = a;
#endif
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// sum of d[q] * x[q] over the NQ vectors of a lanes row, as a tree of two chains
template <int NQ>
inline vfl dot_lanes(const vfl* d, const vfl* x) {
  vfl a = d[0] * x[0];
  if constexpr (NQ == 1) {
    return a;
  } else {
    vfl b = d[1] * x[1];
    for (int q = 2; q + 1 < NQ; q += 2) {
      a += d[q] * x[q];
      b += d[q + 1] * x[q + 1];
    }
    if constexpr (NQ % 2) a += d[NQ - 1] * x[NQ - 1];
    return a + b;
  }
}

// s[i] = horizontal sum of a[i] for four vectors at once: the halvings are shared between pairs,
// ~2 shuffles + 1 add per entry against ~5 + 4 for four separate hsum_vfl.
inline void hsum4(vfl a0, vfl a1, vfl a2, vfl a3, float* s) {
#if defined(__AVX512F__)
  typedef float h8 __attribute__((vector_size(32)));
#define SF_FOLD(a) (__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15))
  const h8 b0 = SF_FOLD(a0), b1 = SF_FOLD(a1), b2 = SF_FOLD(a2), b3 = SF_FOLD(a3);
#undef SF_FOLD
#elif defined(__AVX__)
  const vfl b0 = a0, b1 = a1, b2 = a2, b3 = a3;
#endif
#if defined(__AVX__)
  // [b0 lo+hi (4), b1 lo+hi (4)], [b2 .., b3 ..]
  const auto p01 = __builtin_shufflevector(b0, b1, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(b0, b1, 4, 5, 6, 7, 12, 13, 14, 15);
  const auto p23 = __builtin_shufflevector(b2, b3, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(b2, b3, 4, 5, 6, 7, 12, 13, 14, 15);
  // [s0 (2 partials), s2 (2), s1 (2), s3 (2)]
  const auto q = __builtin_shufflevector(p01, p23, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(p01, p23, 2, 3, 10, 11, 6, 7, 14, 15);
  const auto r = __builtin_shufflevector(q, q, 0, 2, 4, 6) + __builtin_shufflevector(q, q, 1, 3, 5, 7);  // [s0, s2, s1, s3]
  s[0] = r[0];
  s[1] = r[2];
  s[2] = r[1];
  s[3] = r[3];
#else
  const vfl p01 = __builtin_shufflevector(a0, a1, 0, 1, 4, 5) + __builtin_shufflevector(a0, a1, 2, 3, 6, 7);
  const vfl p23 = __builtin_shufflevector(a2, a3, 0, 1, 4, 5) + __builtin_shufflevector(a2, a3, 2, 3, 6, 7);
  const vfl r = __builtin_shufflevector(p01, p23, 0, 2, 4, 6) + __builtin_shufflevector(p01, p23, 1, 3, 5, 7);
  for (int i = 0; i < 4; ++i) s[i] = r[i];
#endif
}

constexpr int64_t kSddmmBlockRows = 256;  // rows sharing one pass over the xt windows

// Rows [r0, r1) (at most kSddmmBlockRows) against one batch tile. Columns are walked in windows of
// T = 64 K floats / W columns (~256 KB of xt, so a window stays in L2 while the rows' entries in it
// stream through); each row keeps its decoder cursor and next value index between windows.
// Entries are taken four at a time (one shared reduction), a window's last 0-3 one by one.
template <int NV, class Dec, class First>
void sddmm_tile(const Dec& dec, const First& first, int64_t cols, const float* xt, const float* dyt, float* dw,
                bool add, int64_t r0, int64_t r1) {
  constexpr int64_t W = 16 * NV;
  constexpr int NQ = static_cast<int>(W / kVL);
  constexpr int64_t T = (int64_t{1} << 16) / W;
  typename Dec::Cur cur[kSddmmBlockRows];
  int64_t next[kSddmmBlockRows];
  for (int64_t r = r0; r < r1; ++r) {
    cur[r - r0] = dec.begin(r);
    next[r - r0] = first(r);
  }
  for (int64_t c0 = 0; c0 < cols; c0 += T) {
    const int64_t c1 = min64(cols, c0 + T);
    for (int64_t r = r0; r < r1; ++r) {
      vfl d[NQ];
      const vfl* dr = reinterpret_cast<const vfl*>(dyt + r * W);
      for (int q = 0; q < NQ; ++q) d[q] = dr[q];
      int64_t v = next[r - r0];  // value index of the next entry to write
      const float* xs[4];
      int n = 0;
      dec.run(cur[r - r0], c1, [&](int64_t j, float) {
        xs[n] = xt + j * W;
        if (++n < 4) return;
        float s[4];
        hsum4(dot_lanes<NQ>(d, reinterpret_cast<const vfl*>(xs[0])), dot_lanes<NQ>(d, reinterpret_cast<const vfl*>(xs[1])),
              dot_lanes<NQ>(d, reinterpret_cast<const vfl*>(xs[2])), dot_lanes<NQ>(d, reinterpret_cast<const vfl*>(xs[3])), s);
        for (int i = 0; i < 4; ++i) dw[v + i] = add ? dw[v + i] + s[i] : s[i];
        v += 4;
        n = 0;
      });
      for (int i = 0; i < n; ++i, ++v) {
        const float s = hsum_vfl(dot_lanes<NQ>(d, reinterpret_cast<const vfl*>(xs[i])));
        dw[v] = add ? dw[v] + s : s;
      }
      next[r - r0] = v;
    }
  }
}

// dw of rows [r0, r1) for every batch tile (xp: x tiles (in, width); dp: dy tiles (out, width)),
// in blocks of at most kSddmmBlockRows rows
template <class Dec, class First>
void sddmm_rows(const Dec& dec, const First& first, const ProblemW& p, const LanesPlan& xp, const LanesPlan& dp,
                int64_t r0, int64_t r1) {
  for (int64_t t = 0; t < xp.ntiles; ++t) {
    const int64_t bn = min64(kLaneTile, p.B - t * kLaneTile);
    const float* xt = xp.xt + t * xp.tile_stride;
    const float* dyt = dp.xt + t * dp.tile_stride;
    const bool add = t > 0;
    for (int64_t b0 = r0; b0 < r1; b0 += kSddmmBlockRows) {
      const int64_t b1 = min64(r1, b0 + kSddmmBlockRows);
      switch ((bn + 15) / 16) {
        case 1: sddmm_tile<1>(dec, first, p.in, xt, dyt, p.dw, add, b0, b1); break;
        case 2: sddmm_tile<2>(dec, first, p.in, xt, dyt, p.dw, add, b0, b1); break;
        case 3: sddmm_tile<3>(dec, first, p.in, xt, dyt, p.dw, add, b0, b1); break;
        default: sddmm_tile<4>(dec, first, p.in, xt, dyt, p.dw, add, b0, b1); break;
      }
    }
  }
}

// The lanes, lanes_t and sddmm entries of a format's kernel table, from its decoders: Fmt::View,
// Fmt::lanes_dec(w, body) / Fmt::dec(w, body) call body with the decoder for the lanes kernel / for
// the others (typed for w's index and value types), Fmt::first(w, r) is the value index of row r's
// first stored entry.
template <class Fmt>
struct DecoderKernels {
  using View = typename Fmt::View;
  static void lanes(const View& w, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) {
    Fmt::lanes_dec(w, [&](const auto& dec) { lanes_rows(dec, p, lp, r0, r1, ybuf); });
  }
  static void lanes_t(const View& w, const ProblemT& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* dxt) {
    Fmt::dec(w, [&](const auto& dec) { lanes_t_rows(dec, p, lp, r0, r1, dxt); });
  }
  static void sddmm(const View& w, const ProblemW& p, const LanesPlan& xp, const LanesPlan& dp, int64_t r0,
                    int64_t r1) {
    Fmt::dec(w, [&](const auto& dec) {
      sddmm_rows(dec, [&](int64_t r) -> int64_t { return Fmt::first(w, r); }, p, xp, dp, r0, r1);
    });
  }
};

}  // namespace
}  // namespace sf
