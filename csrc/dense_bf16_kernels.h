// The widening dense bf16 GEMV kernel (dense_bf16.h), written once with the native vector of the
// including file (lanes.h: zmm in dense_bf16_avx512.cpp, ymm in dense_bf16_avx2.cpp, the portable
// width in dense_bf16.cpp). Internal linkage throughout.
//
// R rows at a time (kDenseBf16Rows, then 4, then 1): per step, kVL bf16 of each row are widened to float32 (zero-extend, shift left
// 16: exact) and multiplied into that row's accumulator vector with x (float32, widened once per
// call). Each row's arithmetic is the same whatever R is: its own accumulator, the same steps, a
// fixed reduction tree, the columns past the last full vector added in order at the end.
#pragma once

#include <cstring>

#include "dense_bf16.h"
#include "lanes.h"

namespace sf {
namespace {

typedef uint16_t vu16_d __attribute__((vector_size(kVL * 2), aligned(2)));  // kVL bf16, unaligned load
typedef uint32_t vu32_d __attribute__((vector_size(kVL * 4)));
typedef float vflu_d __attribute__((vector_size(kVL * 4), aligned(4)));

inline vfl widen_bf16(const uint16_t* p) {
  const vu32_d u = __builtin_convertvector(*reinterpret_cast<const vu16_d*>(p), vu32_d) << 16;
  vfl f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_f32_d(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// sum of the lanes, pairwise halving (a fixed order)
inline float hsum_d(vfl v) {
  float l[kVL];
  std::memcpy(l, &v, sizeof v);
  for (int w = kVL / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) l[i] += l[i + w];
  return l[0];
}

template <int R>
void dots_rows(const uint16_t* W, int64_t in, const float* xf, float* dots) {
  const int64_t kv = in - in % kVL;
  vfl acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vfl{};
  for (int64_t k = 0; k < kv; k += kVL) {
    const vfl xv = *reinterpret_cast<const vflu_d*>(xf + k);
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(reinterpret_cast<const char*>(W + r * in + k) + kDenseBf16PrefetchBytes, 0, 3);
      acc[r] += widen_bf16(W + r * in + k) * xv;
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum_d(acc[r]);
    for (int64_t k = kv; k < in; ++k) s += bf16_to_f32_d(W[r * in + k]) * xf[k];
    dots[r] = s;
  }
}

void dense_bf16_dots_impl(const uint16_t* W, int64_t in, const uint16_t*, const float* xf, int64_t nrows, float* dots) {
  int64_t i = 0;
  for (; i + kDenseBf16Rows <= nrows; i += kDenseBf16Rows) dots_rows<kDenseBf16Rows>(W + i * in, in, xf, dots + i);
  for (; i + 4 <= nrows; i += 4) dots_rows<4>(W + i * in, in, xf, dots + i);
  for (; i < nrows; ++i) dots_rows<1>(W + i * in, in, xf, dots + i);
}

}  // namespace
}  // namespace sf
