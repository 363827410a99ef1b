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

constexpr int64_t kMaxColTile = 1024;  // columns per tile at most (see run_linear for the choice)
// entries of one (row, column tile), with slack: the bitmap decoder finishes the 64-column word it
// started (T is a multiple of 64, but be safe) and vectorised collectors may write 16 past the end
constexpr int64_t kEntryBuf = kMaxColTile + 96;

// acc[s][q] += val[k] * xt[idx[k] * W + q * kVL], consecutive entries spread over S accumulator
// sets (independent FMA chains).
template <int NQ, int S>
inline void fma_entries(const float* xt, const int32_t* idx, const float* val, int64_t n, vfl (*acc)[NQ]) {
  constexpr int64_t W = NQ * kVL;
  int64_t k = 0;
  for (; k + S <= n; k += S) {
    for (int s = 0; s < S; ++s) {
      const vfl* xr = reinterpret_cast<const vfl*>(xt + static_cast<int64_t>(idx[k + s]) * W);
      const float w = val[k + s];
      for (int q = 0; q < NQ; ++q) acc[s][q] += w * xr[q];
    }
  }
  for (; k < n; ++k) {
    const vfl* xr = reinterpret_cast<const vfl*>(xt + static_cast<int64_t>(idx[k]) * W);
    const float w = val[k];
    for (int q = 0; q < NQ; ++q) acc[0][q] += w * xr[q];
  }
}

// One (row, column tile) step: acc (the row's W lanes, in ybuf) += the row's entries in [.., cend).
// Two ways, chosen at compile time:
// - the decoder has `int64_t collect(Cur&, int64_t cend, int32_t* idx, float* vbuf, const float**
//   vals)` (the AVX-512 files add a vectorised one): it lists the entries' columns in idx and points
//   *vals at their float32 values (stored values in place, or widened into vbuf), writing at most
//   16 int32 past the n it returns; then a counted FMA loop over S accumulator sets;
// - otherwise the decoder's run() callback does the FMAs directly (portable and AVX2 files).
template <int NQ, int S, class Dec>
inline auto tile_step(const Dec& dec, typename Dec::Cur& c, int64_t cend, const float* xt, float* yrow, int32_t* idx,
                      float* vbuf, int) -> decltype(dec.collect(c, cend, idx, vbuf, static_cast<const float**>(nullptr)), void()) {
  const float* vals;
  const int64_t n = dec.collect(c, cend, idx, vbuf, &vals);
  if (n == 0) return;
  vfl* yr = reinterpret_cast<vfl*>(yrow);
  vfl acc[S][NQ];
  for (int q = 0; q < NQ; ++q) acc[0][q] = yr[q];
  for (int t = 1; t < S; ++t)
    for (int q = 0; q < NQ; ++q) acc[t][q] = vfl{};
  fma_entries<NQ, S>(xt, idx, vals, n, acc);
  for (int t = 1; t < S; ++t)
    for (int q = 0; q < NQ; ++q) acc[0][q] += acc[t][q];
  for (int q = 0; q < NQ; ++q) yr[q] = acc[0][q];
}
template <int NQ, int S, class Dec>
inline void tile_step(const Dec& dec, typename Dec::Cur& c, int64_t cend, const float* xt, float* yrow, int32_t*,
                      float*, long) {
  constexpr int64_t W = NQ * kVL;
  vfl* yr = reinterpret_cast<vfl*>(yrow);
  vfl acc[NQ];
  for (int q = 0; q < NQ; ++q) acc[q] = yr[q];
  dec.run(c, cend, [&](int64_t j, float w) {
    const vfl* xr = reinterpret_cast<const vfl*>(xt + j * W);
    for (int q = 0; q < NQ; ++q) acc[q] += w * xr[q];
  });
  for (int q = 0; q < NQ; ++q) yr[q] = acc[q];
}

template <int NV, class Dec>
void lanes_tile(const Dec& dec, const Problem& p, const float* xt, int64_t col_tile, int64_t b0, int64_t bn,
                int64_t r0, int64_t r1, float* ybuf, typename Dec::Cur* cur) {
  constexpr int64_t W = 16 * NV;
  constexpr int NQ = static_cast<int>(W / kVL);  // native vectors per row of W lanes
  constexpr int S = NQ >= 4 ? 2 : 4;  // accumulator sets of the collect path (<= 8 vectors of sums)
  alignas(64) int32_t idx[kEntryBuf];
  alignas(64) float vbuf[kEntryBuf];
  const int64_t R = r1 - r0;
  for (int64_t i = 0; i < R * W; ++i) ybuf[i] = 0.f;
  for (int64_t r = 0; r < R; ++r) cur[r] = dec.begin(r0 + r);
  for (int64_t c0 = 0; c0 < p.in; c0 += col_tile) {
    const int64_t c1 = min64(c0 + col_tile, p.in);
    for (int64_t r = 0; r < R; ++r) tile_step<NQ, S>(dec, cur[r], c1, xt, ybuf + r * W, idx, vbuf, 0);
  }
  // batch row by batch row, so y is written in runs of R floats: writing it row by row (stride
  // `out` floats) put up to 64 stores 4 KB apart into one L1 set and cost a third of the time at 95%
  for (int64_t b = 0; b < bn; ++b) {
    float* yb = p.y + (b0 + b) * p.out + r0;
    if (p.bias) {
      for (int64_t r = 0; r < R; ++r) yb[r] = ybuf[r * W + b] + p.bias[r0 + r];
    } else {
      for (int64_t r = 0; r < R; ++r) yb[r] = ybuf[r * W + b] + 0.f;
    }
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
    const int64_t T = max64(64, min64(kMaxColTile, lp.col_tile * 4 / nv) / 64 * 64);  // xt tile ~col_tile * 256 B
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
