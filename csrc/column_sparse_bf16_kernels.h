// bf16 compute for the column-sparse layer (column_sparse_bf16.h), written once and compiled per
// path: column_sparse_bf16.cpp (portable decode, scalar multiply), column_sparse_bf16_avx512.cpp
// (vdpbf16ps) and column_sparse_bf16_amx.cpp (AMX) each define a `Micro` with
//   mul(panel, tile, k0, kc, acc, side): acc[b][n] += sum_{k < kc} xa[b][k0 + k] * panel(k, n)
// (b < nbt * 16, n < kColBf16Outs; kc a multiple of 32), calling side() between its steps (or
// never), and export ColBf16Table<Micro>::kTable.
// Everything has internal linkage.
#pragma once

#include "column_sparse_bf16.h"
#include "linear_bf16_kernels.h"  // bf16_val, expand32 (vpexpandw decoder)

namespace sf {
namespace {

// The 64 bitmap bits of channel c at output j (a multiple of 64, below round64(out)).
inline uint64_t col_bits64(const ColumnSparseWeight& w, int64_t c, int64_t j) { return w.bitmap[c * w.words() + j / 64]; }

// Pair rows [q0, q1) of the panel of channels chan[0 : n) at outputs [j, j + kColBf16Outs): pair row q holds
// (W[j + o, chan[2q]], W[j + o, chan[2q + 1]]) at bf16 positions 2o, 2o + 1; channels past n are
// zero, and so are outputs past the bitmap. cur[k]: the next packed value of chan[k], advanced past the outputs.
template <VT V>
inline void decode_pairs(const ColumnSparseWeight& w, const int32_t* chan, int64_t n, int64_t q0, int64_t q1, int64_t* cur,
                         int64_t j, uint16_t* panel) {
  constexpr int64_t kRow = 2 * kColBf16Outs;  // bf16 per pair row
#if defined(SF_BF16_VECTOR_DECODE)
  // vpermt2w indices: output o's pair from lane o of each channel (low half: o < 16, high: o >= 16)
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                   24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  constexpr int64_t kValueBytes = V == VT::f32 ? 4 : 2, kPrefetchAhead = 128 / kValueBytes;
  // the channel's outputs [j + 64 wi, j + 64 wi + 64) as two vectors of 32 dense bf16
  auto channel = [&](int64_t k, int64_t wi, __m512i& a, __m512i& b) {
    if (k >= n || j / 64 + wi >= w.words()) {
      a = b = _mm512_setzero_si512();
      return;
    }
    const uint64_t m = col_bits64(w, chan[k], j + 64 * wi);
    const uint32_t m0 = static_cast<uint32_t>(m), m1 = static_cast<uint32_t>(m >> 32);
    const int64_t p0 = cur[k], p1 = p0 + __builtin_popcount(m0);
    a = expand32<V>(w.values, p0, m0, w.nnz);
    b = expand32<V>(w.values, p1, m1, w.nnz);
    cur[k] = p1 + __builtin_popcount(m1);
    // the channel's values stream in short runs, one per panel, `in` channels apart: fetch the
    // next runs ahead of time (no hardware prefetcher tracks that many streams)
    if (wi == 0) __builtin_prefetch(static_cast<const char*>(w.values) + (cur[k] + kPrefetchAhead) * kValueBytes, 0, 3);
  };
  for (int64_t k = 2 * q0; k < 2 * q1; k += 2) {
    uint16_t* row = panel + k / 2 * kRow;
#pragma GCC unroll 4
    for (int64_t wi = 0; wi < kColBf16Outs / 64; ++wi) {
      __m512i a0, b0, a1, b1;
      channel(k, wi, a0, b0);
      channel(k + 1, wi, a1, b1);
      uint16_t* r = row + 128 * wi;
      _mm512_store_si512(r, _mm512_permutex2var_epi16(a0, lo, a1));
      _mm512_store_si512(r + 32, _mm512_permutex2var_epi16(a0, hi, a1));
      _mm512_store_si512(r + 64, _mm512_permutex2var_epi16(b0, lo, b1));
      _mm512_store_si512(r + 96, _mm512_permutex2var_epi16(b0, hi, b1));
    }
  }
#else
  for (int64_t k = 2 * q0; k < 2 * q1; ++k) {
    uint16_t* col = panel + k / 2 * kRow + (k & 1);
    int64_t pos = k < n ? cur[k] : 0;
    for (int64_t wi = 0; wi < kColBf16Outs / 64; ++wi) {
      const uint64_t m = k < n && j / 64 + wi < w.words() ? col_bits64(w, chan[k], j + 64 * wi) : 0u;
      for (int64_t o = 0; o < 64; ++o) col[2 * (64 * wi + o)] = ((m >> o) & 1u) ? bf16_val<V>(w.values, pos++) : uint16_t{0};
    }
    if (k < n) cur[k] = pos;
  }
#endif
}

// The block as a sequence of chunks (64 outputs x up to kColBf16Chunk union channels, channels
// inner). Two panels: while the multiply runs on chunk i it calls side() between its steps, and
// side() decodes a few pair rows of chunk i + 1 into the other panel (on AMX the tile unit works
// while the core decodes); the rows it did not reach are decoded after the multiply returns.
template <VT V, class Micro>
void col_bf16_block(const ColBf16Tile& t, int64_t j0, int64_t cw, void* scratch) {
  const ColumnSparseProblem& p = *t.p;
  const ColumnSparseWeight& w = p.w;
  uint16_t* panels[2] = {static_cast<uint16_t*>(scratch),
                         static_cast<uint16_t*>(scratch) + kColBf16PanelBytes / 2};
  float* acc = reinterpret_cast<float*>(static_cast<char*>(scratch) + 2 * kColBf16PanelBytes);
  int64_t* cur = reinterpret_cast<int64_t*>(static_cast<char*>(scratch) + 2 * kColBf16PanelBytes + kColBf16AccBytes);
  const int64_t nblk = w.nblk();
  for (int64_t k = 0; k < t.nu; ++k) cur[k] = w.block_ptr[t.chan[k] * nblk + j0 / kColBlock];
  const int64_t rows = t.nbt * 16;
  const int64_t per_sub = (t.kp + kColBf16Chunk - 1) / kColBf16Chunk;  // chunks per 64 outputs
  const int64_t nsub = (cw + kColBf16Outs - 1) / kColBf16Outs, total = nsub * per_sub;
  struct Chunk {
    int64_t js, k0, kc, n;  // outputs j0 + js, channels U[k0 : k0 + kc), of which n exist
  };
  auto chunk_at = [&](int64_t i) {
    const int64_t k0 = (i % per_sub) * kColBf16Chunk, kc = min64(kColBf16Chunk, t.kp - k0);
    return Chunk{(i / per_sub) * kColBf16Outs, k0, kc, max64(0, min64(kc, t.nu - k0))};
  };
  auto decode = [&](const Chunk& c, int64_t q0, int64_t q1, uint16_t* panel) {
    decode_pairs<V>(w, t.chan + c.k0, c.n, q0, q1, cur + c.k0, j0 + c.js, panel);
  };
  auto write_rows = [&](int64_t js, bool empty) {
    const int64_t no = min64(kColBf16Outs, cw - js);
    for (int64_t b = 0; b < t.bn; ++b) {
      float* yr = p.y + (t.b0 + b) * w.out + j0 + js;
      const float* ar = acc + b * kColBf16Outs;
      for (int64_t o = 0; o < no; ++o) yr[o] = (empty ? 0.f : ar[o]) + (p.bias ? p.bias[j0 + js + o] : 0.f);
    }
  };
  if (total == 0) {  // no active channel: the bias
    for (int64_t js = 0; js < cw; js += kColBf16Outs) write_rows(js, true);
    return;
  }
  constexpr int64_t kPairsPerStep = 4;
  Micro micro;
  int which = 0;
  {
    const Chunk c0 = chunk_at(0);
    decode(c0, 0, c0.kc / 2, panels[0]);
  }
  for (int64_t i = 0; i < total; ++i, which ^= 1) {
    const Chunk c = chunk_at(i);
    if (c.k0 == 0) std::memset(acc, 0, static_cast<size_t>(rows * kColBf16Outs) * 4);
    const bool has_next = i + 1 < total;
    const Chunk nx = has_next ? chunk_at(i + 1) : Chunk{0, 0, 0, 0};
    const int64_t npairs = nx.kc / 2;
    int64_t qn = 0;
    auto side = [&]() {
      if (qn < npairs) {
        const int64_t q1 = min64(npairs, qn + kPairsPerStep);
        decode(nx, qn, q1, panels[which ^ 1]);
        qn = q1;
      }
    };
    micro.mul(panels[which], t, c.k0, c.kc, acc, side);
    if (qn < npairs) decode(nx, qn, npairs, panels[which ^ 1]);
    if (c.k0 + c.kc == t.kp) write_rows(c.js, false);
  }
}

template <class Micro>
struct ColBf16Table {
  static void block(const ColBf16Tile& t, int64_t j0, int64_t cw, void* s) {
    if (t.p->w.vt == VT::f32) col_bf16_block<VT::f32, Micro>(t, j0, cw, s);
    else col_bf16_block<VT::bf16, Micro>(t, j0, cw, s);
  }
  static constexpr ColumnSparseBf16Kernels kTable = {block};
};

}  // namespace
}  // namespace sf
