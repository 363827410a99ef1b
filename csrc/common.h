// Shared plain types for the torch-free sparse kernels (sparseforge/csrc).
//
// Everything here is either a POD struct or a function with internal linkage (anonymous
// namespace): this header is included by translation units compiled with different -m flags
// (scalar, AVX2, AVX-512), and an inline function with external linkage could be merged by the
// linker into its AVX-512 copy and then run on a CPU without AVX-512.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace sf {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

// Element type of stored weight values. Accumulation is always float32. i8: int8 values with
// float32 row scales, read only by the int8 kernels (int8.h); every other view is f32 or bf16.
enum class VT : int { f32 = 0, bf16 = 1, i8 = 2 };

// y (B, out) = x (B, in) @ W^T (+ bias), all float32, row-major, contiguous.
struct Problem {
  const float* x = nullptr;
  int64_t B = 0;
  int64_t in = 0;
  float* y = nullptr;
  int64_t out = 0;
  const float* bias = nullptr;  // (out,) or null
  // the batch-in-lanes kernels' tile (driver.h lanes_rows), 0 = the built-in rule: columns per
  // column tile at 64 lanes (a multiple of 64, <= 1024) and weight rows per task (<= 256). They
  // change the speed only: the row block never changes a bit, the column tile only the float32
  // summation order (per-tile partial sums).
  int64_t col_tile = 0;
  int64_t block_rows = 0;
};

// dx (B, in) = dy (B, out) @ W, the product autograd needs for x.
struct ProblemT {
  const float* dy = nullptr;
  int64_t B = 0;
  int64_t out = 0;
  float* dx = nullptr;
  int64_t in = 0;
};

// dW restricted to the mask (a sampled dense-dense product, SDDMM): for each stored entry q of
// the weight at (r, c), dw[q] = sum_b dy[b, r] * x[b, c], float32 accumulate; dw is in the order
// of the format's values buffer (its "value index").
struct ProblemW {
  const float* x = nullptr;   // (B, in)
  const float* dy = nullptr;  // (B, out)
  int64_t B = 0;
  int64_t in = 0;
  int64_t out = 0;
  float* dw = nullptr;  // (nnz,)
};

// The batch laid out in SIMD lanes: x transposed into tiles of at most 64 batch rows.
// Tile t holds batch rows [64t, 64t + bn) as xt_t[j * width + b] for column j, zero-padded up to
// `width` = 16 * ceil(bn / 16) lanes; tiles start at xt + t * tile_stride (64-byte aligned).
struct LanesPlan {
  const float* xt = nullptr;
  int64_t ntiles = 0;
  int64_t tile_stride = 0;  // floats between tiles
  int64_t col_tile = 128;   // columns per L1 tile of xt
};

constexpr int64_t kLaneTile = 64;  // batch rows per lanes tile (4 vectors of 16 floats)


namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <VT V>
inline float load_val(const void* p, int64_t i) {
  if constexpr (V == VT::f32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (V == VT::i8) {
    return static_cast<float>(static_cast<const int8_t*>(p)[i]);
  } else {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Batch 1: rows r and r + half of [r0, r1) walked side by side: `start(r)` makes a row's walk
// state, `step(row, c)` runs for c = 0, width, ... below `full`, then `finish(row, r)` (an odd last
// row alone, with the same arithmetic, so a row's result depends neither on its partner nor on the
// thread split). Two independent value streams keep about twice as many cache misses in flight as
// one walk: cold weights stream up to ~25% faster on one core (docs/kernels.md, "Batch-1 calls").
template <class Start, class Step, class Finish>
inline void walk_row_pairs(int64_t r0, int64_t r1, int64_t full, int64_t width, Start&& start, Step&& step,
                           Finish&& finish) {
  const int64_t half = (r1 - r0) / 2;
  for (int64_t r = r0; r < r0 + half; ++r) {
    auto a = start(r), b = start(r + half);
    for (int64_t c = 0; c < full; c += width) {
      step(a, c);
      step(b, c);
    }
    finish(a, r);
    finish(b, r + half);
  }
  if ((r1 - r0) % 2) {
    auto a = start(r1 - 1);
    for (int64_t c = 0; c < full; c += width) step(a, c);
    finish(a, r1 - 1);
  }
}

}  // namespace
}  // namespace sf
