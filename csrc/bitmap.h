// Bitmap weights: one bit per weight plus the packed kept values.
//
// Layout (what sparseforge.formats.bitmap.BitmapWeight stores):
//   bitmap       uint8  (rows, ceil(cols/8)) row-major; bit j (LSB first) of byte b of row r is
//                       column 8b + j, 1 = kept; padding bits past cols are 0
//   values       float32 or bfloat16 (nnz,), kept entries in row-major order
//   row_offsets  int64  (rows + 1,) row r's values are [row_offsets[r], row_offsets[r+1])
#pragma once

#include "common.h"

namespace sf {

struct BitmapView {
  int64_t rows = 0, cols = 0, nnz = 0;
  int64_t bpr = 0;  // bytes per bitmap row = ceil(cols / 8)
  const uint8_t* bits = nullptr;
  const int64_t* row_offsets = nullptr;
  const void* val = nullptr;
  VT vt = VT::f32;
};

struct BitmapKernels {
  void (*rows)(const BitmapView&, const Problem&, int64_t r0, int64_t r1);
  void (*lanes)(const BitmapView&, const Problem&, const LanesPlan&, int64_t r0, int64_t r1, float* ybuf);
  void (*lanes_t)(const BitmapView&, const ProblemT&, const LanesPlan&, int64_t r0, int64_t r1, float* dxt);
  // dW at the mask for rows [r0, r1) (sddmm.h); xp / dp: x and dy in lanes tiles
  void (*sddmm)(const BitmapView&, const ProblemW&, const LanesPlan& xp, const LanesPlan& dp, int64_t r0, int64_t r1);
};

namespace scalar { extern const BitmapKernels bitmap; }
namespace avx2 { extern const BitmapKernels bitmap; }
namespace avx512 { extern const BitmapKernels bitmap; }
namespace avx512vp { extern const BitmapKernels bitmap; }  // avx512 + VPOPCNTDQ
// the kernel table of path `isa` (the VPOPCNTDQ build within avx512 where use_vpopcntdq())
const BitmapKernels& bitmap_kernels(Isa isa);

void bitmap_linear_ref(const BitmapView& w, const Problem& p);
void bitmap_linear_t_ref(const BitmapView& w, const ProblemT& p);
void bitmap_linear(const BitmapView& w, const Problem& p, Isa isa, int algo);
void bitmap_linear_t(const BitmapView& w, const ProblemT& p, Isa isa);
// dW restricted to the mask: dw (nnz,) in values order (see ProblemW); reference and dispatched.
void bitmap_sddmm_ref(const BitmapView& w, const ProblemW& p);
void bitmap_sddmm(const BitmapView& w, const ProblemW& p, Isa isa);

namespace {

// 64 bitmap bits starting at column 64*word of a row (bytes past the row end read as 0).
inline uint64_t bitmap_word(const uint8_t* row, int64_t bpr, int64_t word) {
  const int64_t b0 = word * 8;
  uint64_t w = 0;
  if (b0 + 8 <= bpr) {
    std::memcpy(&w, row + b0, 8);
  } else {
    for (int64_t k = 0; b0 + k < bpr; ++k) w |= static_cast<uint64_t>(row[b0 + k]) << (8 * k);
  }
  return w;
}

template <VT V>
struct BitmapDec {
  static constexpr VT kVT = V;
  const uint8_t* bits;
  int64_t bpr, cols;
  const int64_t* ro;
  const void* val;
  struct Cur {
    const uint8_t* row;
    int64_t word;  // next 64-column word
    int64_t vp;    // next value
  };
  explicit BitmapDec(const BitmapView& w) : bits(w.bits), bpr(w.bpr), cols(w.cols), ro(w.row_offsets), val(w.val) {}
  Cur begin(int64_t r) const { return {bits + r * bpr, 0, ro[r]}; }
  // processes whole 64-column words whose first column is < cend
  template <class F>
  void run(Cur& c, int64_t cend, F&& f) const {
    const int64_t lim = min64(cend, cols);
    int64_t vp = c.vp;
    int64_t word = c.word;
    for (; word * 64 < lim; ++word) {
      uint64_t m = bitmap_word(c.row, bpr, word);
      while (m) {
        const int t = __builtin_ctzll(m);
        f(word * 64 + t, load_val<V>(val, vp++));
        m &= m - 1;
      }
    }
    c.word = word;
    c.vp = vp;
  }
};

// f(column, value index) for each stored entry of row r, bit by bit (independent of BitmapDec;
// the scalar references use it)
template <class F>
void bitmap_stored(const BitmapView& w, int64_t r, F&& f) {
  int64_t vp = w.row_offsets[r];
  for (int64_t j = 0; j < w.cols; ++j)
    if ((w.bits[r * w.bpr + j / 8] >> (j % 8)) & 1) f(j, vp++);
}

}  // namespace
}  // namespace sf
