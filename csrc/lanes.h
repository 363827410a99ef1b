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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <utility>

#include "common.h"

namespace sf {

// rows per lanes task (ybuf is kMaxBlockRows * 64 floats, 64 KB). Every row block streams all of xt
// once, so larger blocks looked better on one layer whose weights stayed in L3 (95%: 2.65 -> 2.17
// ms with 1024), but on the 8-layer stack, weights streamed from DRAM, 1024 lost (95% sparsity,
// batch 64, 2 threads: 21.3-24.0 ms with 256 against 22.8-29.0 with 1024, three alternating runs).
constexpr int64_t kMaxBlockRows = 256;

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

// The stored value of entry e broadcast to a vector, 0 for a padding entry (e >= n). With AVX-512 a
// pointer select (to a static zero for padding) and one broadcast load: vbroadcastss for float32,
// vpbroadcastw + vpslld for bfloat16 (exact: bf16 bits << 16), instead of a scalar load, a shift,
// a move to a vector register and a broadcast.
template <VT V>
inline vfl bcast_val(const void* val, int64_t e, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if constexpr (V == VT::f32) {
    static const float kZero = 0.f;
    const float* src = e < n ? static_cast<const float*>(val) + e : &kZero;
    return reinterpret_cast<vfl>(_mm512_set1_ps(*src));
  } else {
    static const uint16_t kZero = 0;
    const uint16_t* src = e < n ? static_cast<const uint16_t*>(val) + e : &kZero;
    return reinterpret_cast<vfl>(_mm512_slli_epi32(_mm512_set1_epi16(static_cast<short>(*src)), 16));
  }
#else
  const float w = e < n ? load_val<V>(val, e) : 0.f;
  return vfl{} + w;
#endif
}

// acc[s][q] += val[k] * xt[idx[k] * W + q * kVL], consecutive entries spread over S accumulator
// sets (independent FMA chains). n is rounded up to a multiple of S with padding entries that read
// column 0 with weight 0 (idx has slack; bcast_val gives 0 for them): no tail loop, so one loop
// exit per (row, tile) to mispredict instead of two. 0 * x[0] adds nothing when x[0] is finite; a
// non-finite x is fixed up afterwards for dense semantics anyway (fix_nonfinite in driver.h).
template <int NQ, int S, VT V>
inline void fma_entries(const float* xt, int32_t* idx, const void* val, int64_t n, vfl (*acc)[NQ]) {
  constexpr int64_t W = NQ * kVL;
  for (int s = 0; s < S; ++s) idx[n + s] = 0;
  for (int64_t k = 0; k < n; k += S) {
    for (int s = 0; s < S; ++s) {
      const int64_t e = k + s;
      const vfl* xr = reinterpret_cast<const vfl*>(xt + static_cast<int64_t>(idx[e]) * W);
      const vfl w = bcast_val<V>(val, e, n);  // bf16: widened here, one shift per entry
      for (int q = 0; q < NQ; ++q) acc[s][q] += w * xr[q];
    }
  }
}

// One (row, column tile) step: acc (the row's W lanes, in ybuf) += the row's entries in [.., cend).
// Two ways, chosen at compile time (has_collect):
// - the decoder has `int64_t collect(Cur&, int64_t cend, int32_t* idx, const void** vals)` and
//   `kValues` (the AVX-512 files add a vectorised one): it lists the entries' columns in idx and
//   points *vals at their stored values (float32 or bf16, in place), writing at most 16 int32 past
//   the n it returns; then a counted FMA loop over S accumulator sets (fma_row; bf16 values are
//   widened there, one at a time: widening them into a buffer first cost ~10% at 75% sparsity), the
//   collect of the next row issued first (tile_rows_pipelined);
// - otherwise the decoder's run() callback does the FMAs directly (portable and AVX2 files).
template <int NQ, int S, class Dec>
inline void tile_step(const Dec& dec, typename Dec::Cur& c, int64_t cend, const float* xt, float* yrow) {
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

// Prefetch n cache lines from p into L2 (the next column tile of xt, a slice per row of the block).
inline void prefetch_lines(const char* p, int64_t n) {
  for (int64_t l = 0; l < n; ++l) __builtin_prefetch(p + l * 64, 0, 2);
}

// Whether Dec has the vectorised collect (see tile_step).
template <class Dec>
auto has_collect(int) -> decltype(std::declval<const Dec&>().collect(std::declval<typename Dec::Cur&>(), int64_t{},
                                                                   static_cast<int32_t*>(nullptr),
                                                                   static_cast<const void**>(nullptr)),
                                  std::true_type{});
template <class Dec>
std::false_type has_collect(long);

// acc (one row's W lanes, in yrow) += the n listed entries
template <int NQ, int S, VT V>
inline void fma_row(const float* xt, int32_t* idx, const void* vals, int64_t n, float* yrow) {
  if (n == 0) return;
  vfl* yr = reinterpret_cast<vfl*>(yrow);
  vfl acc[S][NQ];
  for (int q = 0; q < NQ; ++q) acc[0][q] = yr[q];
  for (int t = 1; t < S; ++t)
    for (int q = 0; q < NQ; ++q) acc[t][q] = vfl{};
  fma_entries<NQ, S, V>(xt, idx, vals, n, acc);
  for (int t = 1; t < S; ++t)
    for (int q = 0; q < NQ; ++q) acc[0][q] += acc[t][q];
  for (int q = 0; q < NQ; ++q) yr[q] = acc[0][q];
}

// One column tile over rows [0, R), the collect of row r + 1 issued before the FMAs of row r (the
// entry count and the loads it depends on are ready a row ahead). Measured neutral on its own
// (within noise at 90% sparsity); kept because it costs nothing and leaves the FMA loop exit
// independent of the collect's loads.
template <int NQ, int S, class Dec>
inline void tile_rows_pipelined(const Dec& dec, typename Dec::Cur* cur, int64_t R, int64_t cend, const float* xt,
                                float* ybuf, int32_t (*idx)[kEntryBuf], const char* next_tile, int64_t lines_per_row) {
  constexpr int64_t W = NQ * kVL;
  const void* vals[2];
  int64_t n_next = dec.collect(cur[0], cend, idx[0], &vals[0]);
  for (int64_t r = 0; r < R; ++r) {
    const int b = static_cast<int>(r & 1);
    const int64_t n = n_next;
    prefetch_lines(next_tile + r * lines_per_row * 64, lines_per_row);
    if (r + 1 < R) n_next = dec.collect(cur[r + 1], cend, idx[b ^ 1], &vals[b ^ 1]);
    fma_row<NQ, S, Dec::kValues>(xt, idx[b], vals[b], n, ybuf + r * W);
  }
}

template <int NV, class Dec>
void lanes_tile(const Dec& dec, const Problem& p, const float* xt, int64_t col_tile, int64_t b0, int64_t bn,
                int64_t r0, int64_t r1, float* ybuf, typename Dec::Cur* cur) {
  constexpr int64_t W = 16 * NV;
  constexpr int NQ = static_cast<int>(W / kVL);  // native vectors per row of W lanes
  constexpr int S = NQ >= 4 ? 2 : 4;  // accumulator sets of the collect path (<= 8 vectors of sums)
  alignas(64) int32_t idx[2][kEntryBuf];
  const int64_t R = r1 - r0;
  for (int64_t i = 0; i < R * W; ++i) ybuf[i] = 0.f;
  for (int64_t r = 0; r < R; ++r) cur[r] = dec.begin(r0 + r);
  for (int64_t c0 = 0; c0 < p.in; c0 += col_tile) {
    const int64_t c1 = min64(c0 + col_tile, p.in);
    const char* next_tile = reinterpret_cast<const char*>(xt + c1 * W);
    // the next column tile of xt (from L3 when xt outgrows L2), a slice of it per row of the block
    const int64_t lines_per_row = (min64(c1 + col_tile, p.in) - c1) * W * 4 / 64 / R + 1;
    if constexpr (decltype(has_collect<Dec>(0))::value) {
      tile_rows_pipelined<NQ, S>(dec, cur, R, c1, xt, ybuf, idx, next_tile, c1 < p.in ? lines_per_row : 0);
    } else {
      for (int64_t r = 0; r < R; ++r) {
        if (c1 < p.in) prefetch_lines(next_tile + r * lines_per_row * 64, lines_per_row);
        tile_step<NQ, S>(dec, cur[r], c1, xt, ybuf + r * W);
      }
    }
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

// y rows [r0, r1) by decoding each row once per batch row (the portable rows kernel)
template <class Dec>
void rows_dec(const Dec& dec, const Problem& p, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int64_t b = 0; b < p.B; ++b) {
      const float* xb = p.x + b * p.in;
      float acc = 0.f;
      auto cur = dec.begin(r);
      dec.run(cur, p.in, [&](int64_t j, float w) { acc += w * xb[j]; });
      p.y[b * p.out + r] = acc + bv;
    }
  }
}

// f(std::integral_constant<int, NB>, b0) for the batch rows in groups of NB = 4 (the last 1..4):
// the rows kernels keep NB accumulators per weight row
template <class F>
inline void for_batch_quads(int64_t B, F&& f) {
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    switch (min64(4, B - b0)) {
      case 1: f(std::integral_constant<int, 1>{}, b0); break;
      case 2: f(std::integral_constant<int, 2>{}, b0); break;
      case 3: f(std::integral_constant<int, 3>{}, b0); break;
      default: f(std::integral_constant<int, 4>{}, b0); break;
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
