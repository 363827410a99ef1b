// Label scores of one (sequence, KV head) (label_select.h), written once with the native vector of
// the including file (lanes.h: zmm in label_select_avx512.cpp, ymm in label_select_avx2.cpp, SSE in
// label_select.cpp). Per 32-token block and kVL code bytes: the bytes widened to int32, the low and
// high nibbles (tokens j and j + 16) converted to float, minus 8, multiplied by the channel's query
// value and summed over the channels; then times the tokens' scales. Internal linkage throughout.
#pragma once

#include "label_select.h"
#include "lanes.h"

namespace sf {
namespace {

typedef uint8_t vu8_l __attribute__((vector_size(kVL), aligned(1)));
typedef int32_t vi32_l __attribute__((vector_size(kVL * 4)));
typedef float vfl_l __attribute__((vector_size(kVL * 4), aligned(4)));

void label_scores_row_impl(const float* q, const uint8_t* codes, const float* scales, int64_t C, int64_t capb,
                           int64_t n, float* out) {
  for (int64_t t0 = 0; t0 < n; t0 += 32) {
    const uint8_t* blk = codes + t0 / 2;
    for (int64_t j = 0; j < 16; j += kVL) {
      vfl lo = vfl{}, hi = vfl{};
      for (int64_t c = 0; c < C; ++c) {
        const vi32_l w = __builtin_convertvector(*reinterpret_cast<const vu8_l*>(blk + c * capb + j), vi32_l);
        const vfl x = __builtin_convertvector(w & 15, vfl) - 8.f, y = __builtin_convertvector(w >> 4, vfl) - 8.f;
        lo += q[c] * x;
        hi += q[c] * y;
      }
      const int64_t a = t0 + j, b = t0 + 16 + j;  // first token of the low / high lanes
      if (b + kVL <= n) {
        *reinterpret_cast<vfl_l*>(out + a) = lo * *reinterpret_cast<const vfl_l*>(scales + a);
        *reinterpret_cast<vfl_l*>(out + b) = hi * *reinterpret_cast<const vfl_l*>(scales + b);
      } else {
        for (int i = 0; i < kVL; ++i) {
          if (a + i < n) out[a + i] = lo[i] * scales[a + i];
          if (b + i < n) out[b + i] = hi[i] * scales[b + i];
        }
      }
    }
  }
}

}  // namespace
}  // namespace sf

// The kernel table of label_select.h for the including file's ISA: `namespace <isa> { SF_DEFINE_LABEL_SELECT_KERNELS }`.
#define SF_DEFINE_LABEL_SELECT_KERNELS extern const LabelScoreFn label_scores_row = label_scores_row_impl;
