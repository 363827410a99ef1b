// The bf16 product's decoders and block kernels (linear_bf16.h), written once and compiled per path:
// linear_bf16.cpp (portable, scalar multiply) and linear_bf16_avx512.cpp (vdpbf16ps) define a
// `Micro` with mul(panel, tile, c0, kc, acc) and export bf16_block<Decoder, Micro> per format
// (PanelBlock); linear_bf16_amx.cpp exports its strip block over the same decoders. Everything has
// internal linkage.
//
// Decoders write columns [c0, c0 + kc) of one weight row as dense bf16 (kc a multiple of 32) and
// keep a per-row cursor between panels: the next value (bitmap), value index (N:M) or entry (CSR).
#pragma once

#include "linear_bf16.h"
#if defined(__AVX512VBMI2__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SF_BF16_VECTOR_DECODE 1
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace sf {
namespace {

template <VT V>
inline uint16_t bf16_val(const void* val, int64_t i) {
  if constexpr (V == VT::bf16) return static_cast<const uint16_t*>(val)[i];
  else return f32_to_bf16(static_cast<const float*>(val)[i]);
}

// 32 bitmap bits from byte `byte` of a row (bytes past the row end read as 0)
inline uint32_t bitmap_bits32(const uint8_t* row, int64_t bpr, int64_t byte) {
  uint32_t m = 0;
  if (byte + 4 <= bpr) {
    std::memcpy(&m, row + byte, 4);
  } else {
    for (int64_t k = 0; byte + k < bpr; ++k) m |= static_cast<uint32_t>(row[byte + k]) << (8 * k);
  }
  return m;
}

#if defined(SF_BF16_VECTOR_DECODE)
// 32 dense bf16 from the values at `vp` placed at the set bits of m: a plain load and the register
// form of vpexpandw (the memory form was the bottleneck of the decode); float32 values: two
// vexpandps and vcvtne2ps2bf16. Loads stop at `end` (the values buffer's end).
template <VT V>
inline __m512i expand32(const void* val, int64_t vp, uint32_t m, int64_t end) {
  if constexpr (V == VT::bf16) {
    const uint16_t* h = static_cast<const uint16_t*>(val) + vp;
    const __m512i v = vp + 32 <= end ? _mm512_loadu_si512(h)
                                     : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << __builtin_popcount(m)) - 1), h);
    return _mm512_maskz_expand_epi16(m, v);
  } else {
    const float* f = static_cast<const float*>(val) + vp;
    const __mmask16 lo = static_cast<__mmask16>(m), hi = static_cast<__mmask16>(m >> 16);
    const __m512 a = _mm512_maskz_expandloadu_ps(lo, f);
    const __m512 b = _mm512_maskz_expandloadu_ps(hi, f + __builtin_popcount(lo));
    return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
  }
}
#endif

// prefetch [p, p + bytes) into the caches, one line at a time (at least the first line)
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o <= bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

inline double density_of(int64_t nnz, int64_t rows, int64_t cols) {
  return rows > 0 && cols > 0 ? static_cast<double>(nnz) / (static_cast<double>(rows) * static_cast<double>(cols)) : 0.0;
}

template <VT V>
struct BitmapPanel {
  using View = BitmapView;
  const BitmapView& w;
  const double dens;
  explicit BitmapPanel(const BitmapView& v) : w(v), dens(density_of(v.nnz, v.rows, v.cols)) {}
  int64_t start(int64_t r) const { return w.row_offsets[r]; }
  // the byte ranges row(r, cursor, c0, kc) will read, as span(p, bytes) calls (its values: estimated
  // from the density)
  template <class F>
  void spans(int64_t r, int64_t cursor, int64_t c0, int64_t kc, F&& span) const {
    span(w.bits + r * w.bpr + c0 / 8, kc / 8 - 1);
    span(static_cast<const char*>(w.val) + cursor * int64_t{V == VT::f32 ? 4 : 2},
         static_cast<int64_t>(dens * static_cast<double>(kc)) * int64_t{V == VT::f32 ? 4 : 2});
  }
  void prefetch(int64_t r, int64_t cursor, int64_t c0, int64_t kc) const { spans(r, cursor, c0, kc, prefetch_span); }
  void row(int64_t r, int64_t& cursor, int64_t c0, int64_t kc, uint16_t* out) const {
    const uint8_t* bits = w.bits + r * w.bpr;
    int64_t vp = cursor;
    for (int64_t s = 0; s < kc; s += 32) {
      const uint32_t m = bitmap_bits32(bits, w.bpr, (c0 + s) / 8);  // c0 + s is a multiple of 32
#if defined(SF_BF16_VECTOR_DECODE)
      _mm512_storeu_si512(out + s, expand32<V>(w.val, vp, m, w.nnz));
      vp += __builtin_popcount(m);
#else
      for (int j = 0; j < 32; ++j) out[s + j] = ((m >> j) & 1u) ? bf16_val<V>(w.val, vp++) : uint16_t{0};
#endif
    }
    cursor = vp;
  }
};

template <VT V>
struct NmPanel {
  using View = NmView;
  const NmView& w;
  explicit NmPanel(const NmView& v) : w(v) {}
  int64_t start(int64_t) const { return 0; }
  template <class F>
  void spans(int64_t r, int64_t, int64_t c0, int64_t kc, F&& span) const {
    const int64_t v0 = c0 / w.m * w.n, nv = kc / w.m * w.n;
    span(w.idx + r * w.ibpr + v0 * w.b / 8, nv * w.b / 8);
    span(static_cast<const char*>(w.val) + (r * w.vpr + v0) * int64_t{V == VT::f32 ? 4 : 2}, nv * int64_t{V == VT::f32 ? 4 : 2});
  }
  void prefetch(int64_t r, int64_t cursor, int64_t c0, int64_t kc) const { spans(r, cursor, c0, kc, prefetch_span); }
  void row(int64_t r, int64_t& v, int64_t c0, int64_t kc, uint16_t* out) const {
    const uint8_t* irow = w.idx + r * w.ibpr;
    const int64_t base = r * w.vpr;
#if defined(SF_BF16_VECTOR_DECODE)
    if (w.n == 2 && w.m == 4) {  // 2:4: 4 index bytes hold 8 groups (32 columns): an expand mask
      for (int64_t s = 0; s < kc; s += 32) {
        const int64_t c = c0 + s;
        const uint32_t nib = bitmap_bits32(irow, w.ibpr, c / 8);
        uint32_t m = static_cast<uint32_t>(kNm24.mask[nib & 255]) | static_cast<uint32_t>(kNm24.mask[(nib >> 8) & 255]) << 8 |
                     static_cast<uint32_t>(kNm24.mask[(nib >> 16) & 255]) << 16 | static_cast<uint32_t>(kNm24.mask[nib >> 24]) << 24;
        if (c + 32 > w.cols) m &= c >= w.cols ? 0u : (1u << (w.cols - c)) - 1u;
        _mm512_storeu_si512(out + s, expand32<V>(w.val, base + c / 2, m, w.rows * w.vpr));
      }
      v = (c0 + kc) / 2;
      return;
    }
#endif
    std::memset(out, 0, static_cast<size_t>(kc) * 2);
    const int64_t cend = c0 + kc;
    while (v < w.vpr) {  // columns ascend with the value index
      const int64_t col = v / w.n * w.m + nm_field(irow, w.ibpr, v * w.b, w.b);
      if (col >= cend) break;
      out[col - c0] = bf16_val<V>(w.val, base + v);
      ++v;
    }
  }
};

template <class I, VT V>
struct CsrPanel {
  using View = CsrView;
  const CsrView& w;
  const double dens;
  explicit CsrPanel(const CsrView& v) : w(v), dens(density_of(v.nnz, v.rows, v.cols)) {}
  int64_t start(int64_t r) const { return w.row_ptr[r]; }
  template <class F>
  void spans(int64_t, int64_t cursor, int64_t, int64_t kc, F&& span) const {
    const int64_t n = static_cast<int64_t>(dens * static_cast<double>(kc));
    span(static_cast<const I*>(w.col) + cursor, n * int64_t{sizeof(I)});
    span(static_cast<const char*>(w.val) + cursor * int64_t{V == VT::f32 ? 4 : 2}, n * int64_t{V == VT::f32 ? 4 : 2});
  }
  void prefetch(int64_t r, int64_t cursor, int64_t c0, int64_t kc) const { spans(r, cursor, c0, kc, prefetch_span); }
  void row(int64_t r, int64_t& q, int64_t c0, int64_t kc, uint16_t* out) const {
    std::memset(out, 0, static_cast<size_t>(kc) * 2);
    const I* col = static_cast<const I*>(w.col);
    const int64_t end = w.row_ptr[r + 1], cend = c0 + kc;
    for (; q < end && static_cast<int64_t>(col[q]) < cend; ++q) out[static_cast<int64_t>(col[q]) - c0] = bf16_val<V>(w.val, q);
  }
};

// y[b0 + b, r0 + i] = acc[i][b] + bias[r0 + i] for the block's nr rows and the tile's batch rows. Each
// batch row gets nr floats, rows `out` floats apart; where they are whole aligned 64-byte lines they go
// out with non-temporal stores: y is written once here and read by the next layer, and a plain store
// first reads each line it writes (one miss per line: 1-2 ms of a 4096x11008 layer at batch 64).
inline void store_y(const float* acc, const Bf16Tile& t, int64_t r0, int64_t nr) {
  const Bf16Problem& p = *t.p;
  alignas(64) float row[kBf16RowBlock];
  bool streamed = false;
  for (int64_t b = 0; b < t.bn; ++b) {
    float* yr = p.y + (t.b0 + b) * p.out + r0;
    for (int64_t i = 0; i < nr; ++i) row[i] = acc[i * kBf16BatchChunk + b] + (p.bias ? p.bias[r0 + i] : 0.f);
#if defined(__SSE2__)
    if (nr == kBf16RowBlock && reinterpret_cast<uintptr_t>(yr) % 64 == 0) {
      for (int64_t i = 0; i < kBf16RowBlock; i += 4) _mm_stream_ps(yr + i, _mm_load_ps(row + i));
      streamed = true;
      continue;
    }
#endif
    std::memcpy(yr, row, static_cast<size_t>(nr) * 4);
  }
#if defined(__SSE2__)
  if (streamed) _mm_sfence();  // the non-temporal stores are visible before the task ends
#endif
  (void)streamed;
}

// Rows [r0, r1) of y for one activation block, panel by panel: after the multiply of one panel the next
// is decoded into the other buffer, each row prefetching its slice of the panel after that.
template <class Panel, class Micro>
void bf16_block(const typename Panel::View& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* scratch) {
  uint16_t* panels[2] = {static_cast<uint16_t*>(scratch),
                         static_cast<uint16_t*>(scratch) + kBf16RowBlock * kBf16PanelLd};
  float* acc = reinterpret_cast<float*>(static_cast<char*>(scratch) + 2 * kBf16PanelBytes);
  int64_t* cur = reinterpret_cast<int64_t*>(static_cast<char*>(scratch) + 2 * kBf16PanelBytes + kBf16AccBytes);
  const Panel dec(w);
  const int64_t nr = r1 - r0;
  for (int64_t i = 0; i < nr; ++i) cur[i] = dec.start(r0 + i);
  for (uint16_t* pn : panels)
    for (int64_t i = nr; i < kBf16RowBlock; ++i) std::memset(pn + i * kBf16PanelLd, 0, kBf16ColChunk * 2);
  std::memset(acc, 0, kBf16AccBytes);
  if (t.kp > 0) {  // the weight streams from memory in short runs per row: prefetch one panel ahead
    const int64_t kc0 = min64(kBf16ColChunk, t.kp);
    for (int64_t i = 0; i < nr; ++i) dec.prefetch(r0 + i, cur[i], 0, kc0);
    for (int64_t i = 0; i < nr; ++i) {
      dec.row(r0 + i, cur[i], 0, kc0, panels[0] + i * kBf16PanelLd);
      if (kc0 < t.kp) dec.prefetch(r0 + i, cur[i], kc0, min64(kBf16ColChunk, t.kp - kc0));
    }
  }
  {
    Micro micro;
    int which = 0;
    for (int64_t c0 = 0; c0 < t.kp; c0 += kBf16ColChunk, which ^= 1) {
      const int64_t kc = min64(kBf16ColChunk, t.kp - c0), c1 = c0 + kc, kc1 = min64(kBf16ColChunk, t.kp - c1);
      uint16_t* next = panels[which ^ 1];
      const int64_t c2 = c1 + kc1, kc2 = min64(kBf16ColChunk, t.kp - c2);
      micro.mul(panels[which], t, c0, kc, acc);
      for (int64_t i = 0; c1 < t.kp && i < nr; ++i) {  // row i of the next panel, and a prefetch of the one after
        dec.row(r0 + i, cur[i], c1, kc1, next + i * kBf16PanelLd);
        if (c2 < t.kp) dec.prefetch(r0 + i, cur[i], c2, kc2);
      }
    }
  }
  store_y(acc, t, r0, nr);
}

// bf16_block with the multiply Micro over rows [r0, r1) block by block, as a block type for Bf16Table
template <class Micro>
struct PanelBlock {
  template <class Panel>
  static void run(const typename Panel::View& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* s) {
    for (int64_t b = r0; b < r1; b += kBf16RowBlock) bf16_block<Panel, Micro>(w, t, b, min64(r1, b + kBf16RowBlock), s);
  }
};

// Column pairs [k0, k1) of batch tile bt of the packed activations (linear_bf16.h: xp [nbt][kp / 2][16],
// rows t.b0 + 16 bt + l, zero past t.bn and past `in`), portable: one dword at a time.
inline void pack_x_scalar(const Bf16Tile& t, uint32_t* xp, int64_t bt, int64_t k0, int64_t k1) {
  const Bf16Problem& p = *t.p;
  const int64_t kph = t.kp / 2, full = p.in / 2, kf = min64(k1, full);
  uint32_t* dst = xp + bt * kph * 16;
  for (int64_t l = 0; l < 16; ++l) {
    const int64_t b = bt * 16 + l;
    int64_t k = k0;
    if (b >= t.bn) {
      for (; k < k1; ++k) dst[k * 16 + l] = 0;
    } else if (p.xf) {
      const float* xr = p.xf + (t.b0 + b) * p.in;
      for (; k < kf; ++k) dst[k * 16 + l] = f32_to_bf16(xr[2 * k]) | static_cast<uint32_t>(f32_to_bf16(xr[2 * k + 1])) << 16;
      for (; k < k1; ++k) dst[k * 16 + l] = 2 * k < p.in ? f32_to_bf16(xr[2 * k]) : 0u;  // odd `in`: last pair half used
    } else {
      const uint16_t* xr = p.x + (t.b0 + b) * p.in;
      for (; k < kf; ++k) {
        uint32_t d;
        std::memcpy(&d, xr + 2 * k, 4);
        dst[k * 16 + l] = d;
      }
      for (; k < k1; ++k) dst[k * 16 + l] = 2 * k < p.in ? xr[2 * k] : 0u;  // odd `in`: last pair half used
    }
  }
}

#if defined(SF_BF16_VECTOR_DECODE)
// float32 -> bf16 in the high half of each dword, the bits of f32_to_bf16: nearest even on the integer
// bits (subnormals rounded like any other value), NaN quieted
inline __m512i round_bf16_hi(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
  return _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
}

// 16 x 16 dwords transposed in registers: r[i] (element j) -> r[j] (element i)
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + m] holds, per 128-bit lane j, row (4j..4j+3) of source rows 4q..4q+3, column m
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// pack_x_scalar 16 column pairs (32 columns) at a time: each batch row's 32 columns become 16 pair
// dwords in one register (float32: rounded, the bf16 halves gathered by vpermt2w), then a 16 x 16
// transpose puts the 16 rows in the lanes. The same bits as pack_x_scalar.
inline void pack_x_vector(const Bf16Tile& t, uint32_t* xp, int64_t bt, int64_t k0, int64_t k1) {
  const Bf16Problem& p = *t.p;
  const int64_t kph = t.kp / 2;
  uint32_t* dst = xp + bt * kph * 16;
  const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25,
                                             23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);  // the high halves of a:b
  for (int64_t k = k0; k < k1; k += 16) {
    const int64_t c = 2 * k, nc = min64(32, p.in - c);  // columns c .. c + nc of each row exist
    __m512i r[16];
    for (int l = 0; l < 16; ++l) {
      const int64_t b = bt * 16 + l;
      if (b >= t.bn || nc <= 0) {
        r[l] = _mm512_setzero_si512();
      } else if (p.xf) {
        const float* xr = p.xf + (t.b0 + b) * p.in + c;
        const __mmask16 mlo = static_cast<__mmask16>(nc >= 16 ? 0xffff : (1u << nc) - 1);
        const __mmask16 mhi = static_cast<__mmask16>(nc >= 32 ? 0xffff : nc <= 16 ? 0 : (1u << (nc - 16)) - 1);
        const __m512i lo = round_bf16_hi(_mm512_maskz_loadu_ps(mlo, xr));
        const __m512i hi = round_bf16_hi(_mm512_maskz_loadu_ps(mhi, xr + 16));
        r[l] = _mm512_permutex2var_epi16(lo, odd_words, hi);
      } else {
        const __mmask32 m = static_cast<__mmask32>(nc >= 32 ? 0xffffffffu : (1u << nc) - 1);
        r[l] = _mm512_maskz_loadu_epi16(m, p.x + (t.b0 + b) * p.in + c);
      }
    }
    transpose16x16_epi32(r);
    const int64_t n = min64(16, k1 - k);
    for (int64_t j = 0; j < n; ++j) _mm512_storeu_si512(dst + (k + j) * 16, r[j]);
  }
}
#endif

// The kernel table of a block type (Block::run<Panel>(w, t, r0, r1, scratch), rows [r0, r1) in blocks of
// kBf16RowBlock): one function per
// format, the value type chosen per call.
template <class Block>
struct Bf16Table {
  static void bitmap(const BitmapView& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* s) {
    if (w.vt == VT::f32) Block::template run<BitmapPanel<VT::f32>>(w, t, r0, r1, s);
    else Block::template run<BitmapPanel<VT::bf16>>(w, t, r0, r1, s);
  }
  static void nm(const NmView& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* s) {
    if (w.vt == VT::f32) Block::template run<NmPanel<VT::f32>>(w, t, r0, r1, s);
    else Block::template run<NmPanel<VT::bf16>>(w, t, r0, r1, s);
  }
  static void csr(const CsrView& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* s) {
    if (w.col_u16) {
      if (w.vt == VT::f32) Block::template run<CsrPanel<uint16_t, VT::f32>>(w, t, r0, r1, s);
      else Block::template run<CsrPanel<uint16_t, VT::bf16>>(w, t, r0, r1, s);
    } else {
      if (w.vt == VT::f32) Block::template run<CsrPanel<int32_t, VT::f32>>(w, t, r0, r1, s);
      else Block::template run<CsrPanel<int32_t, VT::bf16>>(w, t, r0, r1, s);
    }
  }
#if defined(SF_BF16_VECTOR_DECODE)
  static constexpr Bf16Kernels kTable = {bitmap, nm, csr, pack_x_vector};
#else
  static constexpr Bf16Kernels kTable = {bitmap, nm, csr, pack_x_scalar};
#endif
};

}  // namespace
}  // namespace sf
