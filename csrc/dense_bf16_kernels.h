// The widening dense bf16 GEMV kernel (dense_bf16.h), written once with the native vector of the
// including file (lanes.h: zmm in dense_bf16_avx512.cpp, ymm in dense_bf16_avx2.cpp, the portable
// width in dense_bf16.cpp). Internal linkage throughout.
//
// R rows at a time (kWideRows, then 4, then 1): per step, kWideVecs vectors of kVL bf16 of each row are widened to
// float32 (zero-extend, shift left 16: exact) and multiplied into that row's accumulator vectors with x (float32,
// widened once per call). Each row's arithmetic is the same whatever R is: its own accumulators, the same steps,
// a fixed reduction tree, the columns past the last full vector added in order at the end.
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

// Rows in flight, vectors per row and step, and the per-row software prefetch distance (0: none) of the
// widening kernel, per vector width. AVX2 (8 lanes) takes 4 rows x 2 vectors and leaves the weight streams to
// the hardware prefetcher: on a Zen 3 EPYC (2 threads, 11264x2048 weights cycled through 369 MB, median of
// 12, four runs) 8 rows x 1 vector with a prefetch per step streamed 8.8-9.7 GB/s, 4 x 2 without prefetch 11.1-14.0; one
// thread on L2-resident weights, 0.62-0.93 ns per 8 weights against 1.10-2.22 (the step was compute bound).
// The AVX-512 widths keep kDenseBf16Rows rows, one vector and the prefetch (measured on Zen 5 / Xeon).
constexpr int kWideRows = kVL == 8 ? 4 : kDenseBf16Rows;
constexpr int kWideVecs = kVL == 8 ? 2 : 1;
constexpr int64_t kWidePrefetchBytes = kVL == 8 ? 0 : kDenseBf16PrefetchBytes;

template <int R>
void dots_rows(const uint16_t* W, int64_t in, const float* xf, float* dots) {
  constexpr int U = kWideVecs;
  const int64_t kv = in - in % (kVL * U);
  vfl acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = vfl{};
  for (int64_t k = 0; k < kv; k += kVL * U) {
    for (int r = 0; r < R; ++r) {
      if constexpr (kWidePrefetchBytes > 0) {
        __builtin_prefetch(reinterpret_cast<const char*>(W + r * in + k) + kWidePrefetchBytes, 0, 3);
      }
      for (int u = 0; u < U; ++u) {
        acc[r][u] += widen_bf16(W + r * in + k + u * kVL) * *reinterpret_cast<const vflu_d*>(xf + k + u * kVL);
      }
    }
  }
  const int64_t kw = in - in % kVL;  // one more whole vector when U > 1 leaves >= kVL columns
  if (kw > kv) {
    const vfl xv = *reinterpret_cast<const vflu_d*>(xf + kv);
    for (int r = 0; r < R; ++r) acc[r][0] += widen_bf16(W + r * in + kv) * xv;
  }
  for (int r = 0; r < R; ++r) {
    vfl v = acc[r][0];
    for (int u = 1; u < U; ++u) v += acc[r][u];
    float s = hsum_d(v);
    for (int64_t k = kw; k < in; ++k) s += bf16_to_f32_d(W[r * in + k]) * xf[k];
    dots[r] = s;
  }
}

void dense_bf16_dots_impl(const uint16_t* W, int64_t in, const uint16_t*, const float* xf, int64_t nrows, float* dots) {
  int64_t i = 0;
  for (; i + kWideRows <= nrows; i += kWideRows) dots_rows<kWideRows>(W + i * in, in, xf, dots + i);
  for (; i + 4 <= nrows; i += 4) dots_rows<4>(W + i * in, in, xf, dots + i);
  for (; i < nrows; ++i) dots_rows<1>(W + i * in, in, xf, dots + i);
}

}  // namespace
}  // namespace sf
