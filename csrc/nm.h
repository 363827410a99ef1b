// N:M packed weights: n kept values and their in-group positions for every group of m inputs.
//
// Layout (what sparseforge.formats.nm.NMWeight stores), G = cols / m, b = ceil(log2 m) bits:
//   values   float32 or bfloat16 (rows, G*n), group g of row r owns values[r, g*n:(g+1)*n],
//            ascending position
//   indices  uint8 (rows, ceil(G*n*b/8)): per row one little-endian bit stream, value k's
//            position in bits [k*b, k*b+b), LSB first; rows padded to a byte
// Every group stores exactly n entries (short groups are padded with explicit zeros).
#pragma once

#include "common.h"

namespace sf {

struct NmView {
  int64_t rows = 0, cols = 0;
  int n = 2, m = 4, b = 2;
  int64_t vpr = 0;   // values per row = cols / m * n
  int64_t ibpr = 0;  // index bytes per row = ceil(vpr * b / 8)
  const void* val = nullptr;
  const uint8_t* idx = nullptr;
  VT vt = VT::f32;
};

struct NmKernels {
  void (*rows)(const NmView&, const Problem&, int64_t r0, int64_t r1);
  void (*lanes)(const NmView&, const Problem&, const LanesPlan&, int64_t r0, int64_t r1, float* ybuf);
  void (*lanes_t)(const NmView&, const ProblemT&, const LanesPlan&, int64_t r0, int64_t r1, float* dxt);
  // dW at the mask for rows [r0, r1) (sddmm.h); xp / dp: x and dy in lanes tiles
  void (*sddmm)(const NmView&, const ProblemW&, const LanesPlan& xp, const LanesPlan& dp, int64_t r0, int64_t r1);
};

namespace scalar { extern const NmKernels nm; }
namespace avx2 { extern const NmKernels nm; }
namespace avx512 { extern const NmKernels nm; }
namespace avx512vp { extern const NmKernels nm; }  // avx512 + VPOPCNTDQ
// the kernel table of path `isa` (the VPOPCNTDQ build within avx512 where use_vpopcntdq())
const NmKernels& nm_kernels(Isa isa);

void nm_linear_ref(const NmView& w, const Problem& p);
void nm_linear_t_ref(const NmView& w, const ProblemT& p);
void nm_linear(const NmView& w, const Problem& p, Isa isa, int algo);
void nm_linear_t(const NmView& w, const ProblemT& p, Isa isa);
// dW restricted to the mask: dw (nnz,) in values order (see ProblemW); reference and dispatched.
void nm_sddmm_ref(const NmView& w, const ProblemW& p);
void nm_sddmm(const NmView& w, const ProblemW& p, Isa isa);

namespace {

// b-bit field starting at stream bit `bit` of an index row (b <= 8)
inline int nm_field(const uint8_t* irow, int64_t ibpr, int64_t bit, int b) {
  const int64_t byte = bit >> 3;
  const int sh = static_cast<int>(bit & 7);
  uint32_t w = irow[byte];
  if (sh + b > 8 && byte + 1 < ibpr) w |= static_cast<uint32_t>(irow[byte + 1]) << 8;
  return static_cast<int>((w >> sh) & ((1u << b) - 1));
}

// Writes the columns of values [v0, v0 + count) of a row into cols_out (int32).
inline void nm_decode_cols(const NmView& w, const uint8_t* irow, int64_t v0, int64_t count, int32_t* cols_out) {
  int64_t g = v0 / w.n;
  int k = static_cast<int>(v0 - g * w.n);
  int64_t bit = v0 * w.b;
  for (int64_t i = 0; i < count; ++i, bit += w.b) {
    cols_out[i] = static_cast<int32_t>(g * w.m + nm_field(irow, w.ibpr, bit, w.b));
    if (++k == w.n) {
      k = 0;
      ++g;
    }
  }
}

template <VT V>
struct NmDec {
  static constexpr VT kVT = V;
  NmView w;
  struct Cur {
    const uint8_t* irow;
    int64_t g;      // next group
    int64_t vbase;  // index of the row's first value
  };
  explicit NmDec(const NmView& v) : w(v) {}
  Cur begin(int64_t r) const { return {w.idx + r * w.ibpr, 0, r * w.vpr}; }
  // processes whole groups whose first column is < cend
  template <class F>
  void run(Cur& c, int64_t cend, F&& f) const {
    const int64_t G = w.cols / w.m;
    int64_t g = c.g;
    if (w.n == 2 && w.m == 4) {  // 2:4: one index nibble per group
      for (; g < G && g * 4 < cend; ++g) {
        const unsigned nib = (c.irow[g >> 1] >> ((g & 1) * 4)) & 15u;
        f(g * 4 + (nib & 3), load_val<V>(w.val, c.vbase + 2 * g));
        f(g * 4 + (nib >> 2), load_val<V>(w.val, c.vbase + 2 * g + 1));
      }
      c.g = g;
      return;
    }
    for (; g < G && g * w.m < cend; ++g) {
      int64_t v = g * w.n;
      for (int k = 0; k < w.n; ++k, ++v) {
        const int pos = nm_field(c.irow, w.ibpr, v * w.b, w.b);
        f(g * w.m + pos, load_val<V>(w.val, c.vbase + v));
      }
    }
    c.g = g;
  }
};

// 2:4 fast path: one index byte holds two groups (8 columns); kNm24.mask[byte] is their 8-bit
// keep-mask. Built at compile time (no run-time initialiser in the ISA files).
struct Nm24Lut {
  uint8_t mask[256];
  constexpr Nm24Lut() : mask() {
    for (int v = 0; v < 256; ++v) {
      const int g0 = v & 15, g1 = v >> 4;
      const int m0 = (1 << (g0 & 3)) | (1 << (g0 >> 2));
      const int m1 = (1 << (g1 & 3)) | (1 << (g1 >> 2));
      mask[v] = static_cast<uint8_t>(m0 | (m1 << 4));
    }
  }
};
constexpr Nm24Lut kNm24{};

// f(column, value index) for each stored entry of row r, reading the index stream one bit at a
// time (independent of NmDec; the scalar references use it)
template <class F>
void nm_stored(const NmView& w, int64_t r, F&& f) {
  const uint8_t* irow = w.idx + r * w.ibpr;
  for (int64_t v = 0; v < w.vpr; ++v) {
    int pos = 0;
    for (int t = 0; t < w.b; ++t) {
      const int64_t bit = v * w.b + t;
      pos |= ((irow[bit / 8] >> (bit % 8)) & 1) << t;
    }
    f((v / w.n) * w.m + pos, r * w.vpr + v);
  }
}

}  // namespace
}  // namespace sf
