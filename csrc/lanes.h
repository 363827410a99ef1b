// Batch-in-lanes kernels, generic over the format decoders (CsrDec, BitmapDec, NmDec).
//
// For a batch of B >= a few rows the weights are reused B times, so the work is compute bound.
// x is transposed into tiles xt (in, width) (width = 16, 32, 48 or 64 batch rows), and every
// stored weight w at column j of row r does acc[r][0:width] += w * xt[j][0:width]: one broadcast
// and width/16 FMAs on 16-float vectors. The columns are walked in tiles of T so that the
// xt tile (T * width * 4 bytes, ~32 KB) stays in L1 while a block of rows streams through it;
// each row keeps its decoder cursor between column tiles and its partial sums in ybuf.
//
// Written with GCC/Clang vector extensions of the file's native width: zmm in the AVX-512 file,
// ymm in the AVX2 file, SSE in the portable file. Everything has internal linkage.
#pragma once

#include "common.h"

namespace sf {

constexpr int64_t kMaxBlockRows = 256;  // rows per lanes task (ybuf is kMaxBlockRows * 64 floats)

namespace {

// The native vector of the file including this header (each ISA file has its own copy): a
// 64-byte vector type on a target without AVX-512 is lowered element by element, ~25x slower.
#if defined(__AVX512F__)
constexpr int kVL = 16;
#elif defined(__AVX__)
constexpr int kVL = 8;
#else
constexpr int kVL = 4;
#endif
typedef float vfl __attribute__((vector_size(kVL * 4)));

template <int NV, class Dec>
void lanes_tile(const Dec& dec, const Problem& p, const float* xt, int64_t col_tile, int64_t b0, int64_t bn,
                int64_t r0, int64_t r1, float* ybuf, typename Dec::Cur* cur) {
  constexpr int64_t W = 16 * NV;
  constexpr int NQ = static_cast<int>(W / kVL);  // native vectors per row of W lanes
  const int64_t R = r1 - r0;
  for (int64_t i = 0; i < R * W; ++i) ybuf[i] = 0.f;
  for (int64_t r = 0; r < R; ++r) cur[r] = dec.begin(r0 + r);
  for (int64_t c0 = 0; c0 < p.in; c0 += col_tile) {
    const int64_t c1 = min64(c0 + col_tile, p.in);
    for (int64_t r = 0; r < R; ++r) {
      vfl* yr = reinterpret_cast<vfl*>(ybuf + r * W);
      vfl acc[NQ];
      for (int q = 0; q < NQ; ++q) acc[q] = yr[q];
      dec.run(cur[r], c1, [&](int64_t j, float w) {
        const vfl* xr = reinterpret_cast<const vfl*>(xt + j * W);
        for (int q = 0; q < NQ; ++q) acc[q] += w * xr[q];
      });
      for (int q = 0; q < NQ; ++q) yr[q] = acc[q];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const float bv = p.bias ? p.bias[r0 + r] : 0.f;
    float* yb = p.y + b0 * p.out + r0 + r;
    for (int64_t b = 0; b < bn; ++b) yb[b * p.out] = ybuf[r * W + b] + bv;
  }
}

// y rows [r0, r1) for every batch tile of the plan; ybuf: (r1 - r0) * 64 floats, 64-byte aligned
template <class Dec>
void lanes_rows(const Dec& dec, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) {
  typename Dec::Cur cur[kMaxBlockRows];
  for (int64_t t = 0; t < lp.ntiles; ++t) {
    const int64_t b0 = t * kLaneTile;
    const int64_t bn = min64(kLaneTile, p.B - b0);
    const float* xt = lp.xt + t * lp.tile_stride;
    const int64_t nv = (bn + 15) / 16;
    const int64_t T = lp.col_tile * 4 / nv;
    switch (nv) {
      case 1: lanes_tile<1>(dec, p, xt, T, b0, bn, r0, r1, ybuf, cur); break;
      case 2: lanes_tile<2>(dec, p, xt, T, b0, bn, r0, r1, ybuf, cur); break;
      case 3: lanes_tile<3>(dec, p, xt, T, b0, bn, r0, r1, ybuf, cur); break;
      default: lanes_tile<4>(dec, p, xt, T, b0, bn, r0, r1, ybuf, cur); break;
    }
  }
}

template <int NV, class Dec>
void lanes_t_tile(const Dec& dec, int64_t cols, const float* dyt, float* dxt, int64_t r0, int64_t r1) {
  constexpr int64_t W = 16 * NV;
  constexpr int NQ = static_cast<int>(W / kVL);
  for (int64_t r = r0; r < r1; ++r) {
    vfl d[NQ];
    const vfl* dr = reinterpret_cast<const vfl*>(dyt + r * W);
    for (int q = 0; q < NQ; ++q) d[q] = dr[q];
    auto cur = dec.begin(r);
    dec.run(cur, cols, [&](int64_t j, float w) {
      vfl* xr = reinterpret_cast<vfl*>(dxt + j * W);
      for (int q = 0; q < NQ; ++q) xr[q] += w * d[q];
    });
  }
}

// dxt (this worker's accumulator, tiles of (in, 64) floats) += W[r0:r1]^T-scatter of dy tiles
template <class Dec>
void lanes_t_rows(const Dec& dec, const ProblemT& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* dxt) {
  for (int64_t t = 0; t < lp.ntiles; ++t) {
    const int64_t bn = min64(kLaneTile, p.B - t * kLaneTile);
    const float* dyt = lp.xt + t * lp.tile_stride;
    float* acc = dxt + t * p.in * kLaneTile;
    switch ((bn + 15) / 16) {
      case 1: lanes_t_tile<1>(dec, p.in, dyt, acc, r0, r1); break;
      case 2: lanes_t_tile<2>(dec, p.in, dyt, acc, r0, r1); break;
      case 3: lanes_t_tile<3>(dec, p.in, dyt, acc, r0, r1); break;
      default: lanes_t_tile<4>(dec, p.in, dyt, acc, r0, r1); break;
    }
  }
}

}  // namespace
}  // namespace sf
