// The bf16 panel product (linear_bf16.h), written once and compiled per path: linear_bf16.cpp
// (portable, scalar multiply), linear_bf16_avx512.cpp (vdpbf16ps) and linear_bf16_amx.cpp (AMX)
// each include this header, define their multiply (a `Micro` with mul(panel, tile, c0, kc, acc))
// and export block<Decoder, Micro> per format. Everything has internal linkage.
//
// Decoders write columns [c0, c0 + kc) of one weight row as dense bf16 (kc a multiple of 32) and
// keep a per-row cursor between panels: the next value (bitmap), value index (N:M) or entry (CSR).
#pragma once

#include "linear_bf16.h"
#if defined(__AVX512VBMI2__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SF_BF16_VECTOR_DECODE 1
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
// 32 dense bf16 from the values at `vp` placed at the set bits of m (vpexpandw; float32 values are
// expanded 16 at a time and rounded with vcvtne2ps2bf16)
template <VT V>
inline __m512i expand32(const void* val, int64_t vp, uint32_t m) {
  if constexpr (V == VT::bf16) {
    return _mm512_maskz_expandloadu_epi16(m, static_cast<const uint16_t*>(val) + vp);
  } else {
    const float* f = static_cast<const float*>(val) + vp;
    const __mmask16 lo = static_cast<__mmask16>(m), hi = static_cast<__mmask16>(m >> 16);
    const __m512 a = _mm512_maskz_expandloadu_ps(lo, f);
    const __m512 b = _mm512_maskz_expandloadu_ps(hi, f + __builtin_popcount(lo));
    return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
  }
}
#endif

template <VT V>
struct BitmapPanel {
  using View = BitmapView;
  const BitmapView& w;
  explicit BitmapPanel(const BitmapView& v) : w(v) {}
  int64_t start(int64_t r) const { return w.row_offsets[r]; }
  void row(int64_t r, int64_t& vp, int64_t c0, int64_t kc, uint16_t* out) const {
    const uint8_t* bits = w.bits + r * w.bpr;
    for (int64_t s = 0; s < kc; s += 32) {
      const uint32_t m = bitmap_bits32(bits, w.bpr, (c0 + s) / 8);  // c0 + s is a multiple of 32
#if defined(SF_BF16_VECTOR_DECODE)
      _mm512_storeu_si512(out + s, expand32<V>(w.val, vp, m));
      vp += __builtin_popcount(m);
#else
      for (int j = 0; j < 32; ++j) out[s + j] = ((m >> j) & 1u) ? bf16_val<V>(w.val, vp++) : uint16_t{0};
#endif
    }
  }
};

template <VT V>
struct NmPanel {
  using View = NmView;
  const NmView& w;
  explicit NmPanel(const NmView& v) : w(v) {}
  int64_t start(int64_t) const { return 0; }
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
        _mm512_storeu_si512(out + s, expand32<V>(w.val, base + c / 2, m));
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
  explicit CsrPanel(const CsrView& v) : w(v) {}
  int64_t start(int64_t r) const { return w.row_ptr[r]; }
  void row(int64_t r, int64_t& q, int64_t c0, int64_t kc, uint16_t* out) const {
    std::memset(out, 0, static_cast<size_t>(kc) * 2);
    const I* col = static_cast<const I*>(w.col);
    const int64_t end = w.row_ptr[r + 1], cend = c0 + kc;
    for (; q < end && static_cast<int64_t>(col[q]) < cend; ++q) out[static_cast<int64_t>(col[q]) - c0] = bf16_val<V>(w.val, q);
  }
};

// Rows [r0, r1) of y for one activation block: decode a panel, multiply, repeat over the columns.
template <class Panel, class Micro>
void bf16_block(const typename Panel::View& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* scratch) {
  uint16_t* panel = static_cast<uint16_t*>(scratch);
  float* acc = reinterpret_cast<float*>(static_cast<char*>(scratch) + kBf16PanelBytes);
  int64_t* cur = reinterpret_cast<int64_t*>(static_cast<char*>(scratch) + kBf16PanelBytes + kBf16AccBytes);
  const Panel dec(w);
  const int64_t nr = r1 - r0;
  for (int64_t i = 0; i < nr; ++i) cur[i] = dec.start(r0 + i);
  for (int64_t i = nr; i < kBf16RowBlock; ++i) std::memset(panel + i * kBf16PanelLd, 0, kBf16ColChunk * 2);
  std::memset(acc, 0, kBf16AccBytes);
  {
    Micro micro;
    for (int64_t c0 = 0; c0 < t.kp; c0 += kBf16ColChunk) {
      const int64_t kc = min64(kBf16ColChunk, t.kp - c0);
      for (int64_t i = 0; i < nr; ++i) dec.row(r0 + i, cur[i], c0, kc, panel + i * kBf16PanelLd);
      micro.mul(panel, t, c0, kc, acc);
    }
  }
  const Bf16Problem& p = *t.p;
  for (int64_t b = 0; b < t.bn; ++b) {
    float* yr = p.y + (t.b0 + b) * p.out + r0;
    for (int64_t i = 0; i < nr; ++i) yr[i] = acc[i * kBf16BatchChunk + b] + (p.bias ? p.bias[r0 + i] : 0.f);
  }
}

// The kernel table of a multiply: one block function per format, the value type chosen per call.
template <class Micro>
struct Bf16Table {
  static void bitmap(const BitmapView& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* s) {
    if (w.vt == VT::f32) bf16_block<BitmapPanel<VT::f32>, Micro>(w, t, r0, r1, s);
    else bf16_block<BitmapPanel<VT::bf16>, Micro>(w, t, r0, r1, s);
  }
  static void nm(const NmView& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* s) {
    if (w.vt == VT::f32) bf16_block<NmPanel<VT::f32>, Micro>(w, t, r0, r1, s);
    else bf16_block<NmPanel<VT::bf16>, Micro>(w, t, r0, r1, s);
  }
  static void csr(const CsrView& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* s) {
    if (w.col_u16) {
      if (w.vt == VT::f32) bf16_block<CsrPanel<uint16_t, VT::f32>, Micro>(w, t, r0, r1, s);
      else bf16_block<CsrPanel<uint16_t, VT::bf16>, Micro>(w, t, r0, r1, s);
    } else {
      if (w.vt == VT::f32) bf16_block<CsrPanel<int32_t, VT::f32>, Micro>(w, t, r0, r1, s);
      else bf16_block<CsrPanel<int32_t, VT::bf16>, Micro>(w, t, r0, r1, s);
    }
  }
  static constexpr Bf16Kernels kTable = {bitmap, nm, csr};
};

}  // namespace
}  // namespace sf
