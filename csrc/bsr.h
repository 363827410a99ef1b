// Block-sparse rows (BSR) for Block(h, w) patterns: dense h x w blocks on an aligned grid.
//
// Layout (what sparseforge.formats.bsr.BSRWeight stores), rows % h == 0, cols % w == 0:
//   block_row_ptr  int32 (rows/h + 1,)  block row R's blocks are [block_row_ptr[R], block_row_ptr[R+1])
//   block_col      uint16 (nblocks,) when cols/w <= 65536, else int32: the block column (column / w)
//                  of each block, strictly ascending within a block row
//   values         float32 or bfloat16 (nblocks, h, w): block b's row i, column jj is weight
//                  (R*h + i, block_col[b]*w + jj); zeros inside a kept block are stored
// The value index of that entry is (b*h + i)*w + jj (row-major over (nblocks, h, w)).
#pragma once

#include "common.h"

namespace sf {

struct BsrView {
  int64_t rows = 0, cols = 0;
  int64_t h = 1, w = 1;
  int64_t nblocks = 0;
  const int32_t* brp = nullptr;
  const void* bcol = nullptr;
  bool bcol_u16 = true;
  const void* val = nullptr;
  VT vt = VT::f32;
  int64_t block_col(int64_t b) const {
    return bcol_u16 ? int64_t{static_cast<const uint16_t*>(bcol)[b]} : int64_t{static_cast<const int32_t*>(bcol)[b]};
  }
};

struct BsrKernels {
  void (*rows)(const BsrView&, const Problem&, int64_t r0, int64_t r1);
  void (*lanes)(const BsrView&, const Problem&, const LanesPlan&, int64_t r0, int64_t r1, float* ybuf);
  void (*lanes_t)(const BsrView&, const ProblemT&, const LanesPlan&, int64_t r0, int64_t r1, float* dxt);
  void (*sddmm)(const BsrView&, const ProblemW&, const LanesPlan& xp, const LanesPlan& dp, int64_t r0, int64_t r1);
};

namespace scalar { extern const BsrKernels bsr; }
namespace avx2 { extern const BsrKernels bsr; }
namespace avx512 { extern const BsrKernels bsr; }

void bsr_linear_ref(const BsrView& w, const Problem& p);
void bsr_linear_t_ref(const BsrView& w, const ProblemT& p);
void bsr_sddmm_ref(const BsrView& w, const ProblemW& p);
// algo: 0 auto, 1 rows (per-block dense micro-kernel), 2 lanes (batch in SIMD lanes)
void bsr_linear(const BsrView& w, const Problem& p, Isa isa, int algo);
void bsr_linear_t(const BsrView& w, const ProblemT& p, Isa isa);
void bsr_sddmm(const BsrView& w, const ProblemW& p, Isa isa);

namespace {

// Walks row r's stored entries (w per kept block of its block row) in column order; run() stops
// before the first block whose first column is >= cend.
template <VT V>
struct BsrDec {
  BsrView v;
  struct Cur {
    int64_t b, bend;  // next block, end of the block row
    int64_t i;        // row within the block
  };
  explicit BsrDec(const BsrView& view) : v(view) {}
  Cur begin(int64_t r) const { return {v.brp[r / v.h], v.brp[r / v.h + 1], r % v.h}; }
  template <class F>
  void run(Cur& c, int64_t cend, F&& f) const {
    int64_t b = c.b;
    for (; b < c.bend; ++b) {
      const int64_t c0 = v.block_col(b) * v.w;
      if (c0 >= cend) break;
      const int64_t q0 = (b * v.h + c.i) * v.w;
      for (int64_t jj = 0; jj < v.w; ++jj) f(c0 + jj, load_val<V>(v.val, q0 + jj));
    }
    c.b = b;
  }
};

template <class Body>
void with_bsr_dec(const BsrView& w, Body&& body) {
  if (w.vt == VT::f32) body(BsrDec<VT::f32>(w)); else body(BsrDec<VT::bf16>(w));
}

}  // namespace
}  // namespace sf
