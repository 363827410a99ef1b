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

template <int NV, class Dec, class First>
void sddmm_tile(const Dec& dec, const First& first, int64_t cols, const float* xt, const float* dyt, float* dw,
                bool add, int64_t r0, int64_t r1) {
  constexpr int64_t W = 16 * NV;
  constexpr int NQ = static_cast<int>(W / kVL);
  for (int64_t r = r0; r < r1; ++r) {
    vfl d[NQ];
    const vfl* dr = reinterpret_cast<const vfl*>(dyt + r * W);
    for (int q = 0; q < NQ; ++q) d[q] = dr[q];
    int64_t v = first(r);
    auto cur = dec.begin(r);
    dec.run(cur, cols, [&](int64_t j, float) {
      const float s = hsum_vfl(dot_lanes<NQ>(d, reinterpret_cast<const vfl*>(xt + j * W)));
      dw[v] = add ? dw[v] + s : s;
      ++v;
    });
  }
}

// dw of rows [r0, r1) for every batch tile (xp: x tiles (in, width); dp: dy tiles (out, width))
template <class Dec, class First>
void sddmm_rows(const Dec& dec, const First& first, const ProblemW& p, const LanesPlan& xp, const LanesPlan& dp,
                int64_t r0, int64_t r1) {
  for (int64_t t = 0; t < xp.ntiles; ++t) {
    const int64_t bn = min64(kLaneTile, p.B - t * kLaneTile);
    const float* xt = xp.xt + t * xp.tile_stride;
    const float* dyt = dp.xt + t * dp.tile_stride;
    const bool add = t > 0;
    switch ((bn + 15) / 16) {
      case 1: sddmm_tile<1>(dec, first, p.in, xt, dyt, p.dw, add, r0, r1); break;
      case 2: sddmm_tile<2>(dec, first, p.in, xt, dyt, p.dw, add, r0, r1); break;
      case 3: sddmm_tile<3>(dec, first, p.in, xt, dyt, p.dw, add, r0, r1); break;
      default: sddmm_tile<4>(dec, first, p.in, xt, dyt, p.dw, add, r0, r1); break;
    }
  }
}

}  // namespace
}  // namespace sf
