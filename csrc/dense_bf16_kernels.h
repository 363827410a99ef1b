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

#if defined(__AVX2__)
#include <immintrin.h>
#endif

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
// widening kernel (measured on Zen 5 / Xeon with AVX-512; AVX2 runs dense_bf16_pair_dots below).
constexpr int kWideRows = kDenseBf16Rows;
constexpr int kWideVecs = 1;
constexpr int64_t kWidePrefetchBytes = kDenseBf16PrefetchBytes;

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

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2: each 32-bit lane of a 32-byte load holds two bf16, columns 2j and 2j + 1 of a 16-column block; the low
// one becomes a float32 by a shift left 16, the high one by masking the low half off (both exact), so a step
// of 16 columns costs one load, one shift, one AND and two FMAs per row and no shuffle. x comes widened once
// per call in the pair layout (widen_x_pairs: per whole 16-column block its 8 even columns, then its 8 odd
// ones; the columns past the last whole block in order). Each row sums its even and odd columns in two
// accumulator vectors, adds them, reduces the lanes pairwise, then adds the tail columns in order. 4 rows
// per step. The widening kernel above compiled, at this width, to four shuffle uops per 8 columns (two
// vpmovzxwd, a vpsrldq, a vinserti128); on a Zen 3 EPYC (two shuffle pipes; 2 threads, weights cycled through
// 400 MB, calls back to back, builds alternating) this kernel streamed 11264x2048 at 16.8-21.1 GB/s against
// 13.2-16.8, and one thread 12.5 against 9.3.
constexpr int64_t kPairBlock = 16;

inline void widen_x_pairs(const uint16_t* x, int64_t in, float* xp) {
  const int64_t kv = in - in % kPairBlock;
  for (int64_t k = 0; k < kv; k += kPairBlock) {
    for (int j = 0; j < 8; ++j) {
      xp[k + j] = bf16_to_f32_d(x[k + 2 * j]);
      xp[k + 8 + j] = bf16_to_f32_d(x[k + 2 * j + 1]);
    }
  }
  for (int64_t k = kv; k < in; ++k) xp[k] = bf16_to_f32_d(x[k]);
}

template <int R>
void pair_rows(const uint16_t* W, int64_t in, const float* xp, float* dots) {
  const int64_t kv = in - in % kPairBlock;
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kv; k += kPairBlock) {
    const __m256 xe = _mm256_loadu_ps(xp + k), xo = _mm256_loadu_ps(xp + k + 8);
    for (int r = 0; r < R; ++r) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + r * in + k));
      lo[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), xe, lo[r]);
      hi[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(w, high)), xo, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum_d(static_cast<vfl>(_mm256_add_ps(lo[r], hi[r])));
    for (int64_t k = kv; k < in; ++k) s += bf16_to_f32_d(W[r * in + k]) * xp[k];
    dots[r] = s;
  }
}

// xp: x in the pair layout (widen_x_pairs)
void dense_bf16_pair_dots(const uint16_t* W, int64_t in, const uint16_t*, const float* xp, int64_t nrows, float* dots) {
  int64_t i = 0;
  for (; i + 4 <= nrows; i += 4) pair_rows<4>(W + i * in, in, xp, dots + i);
  for (; i < nrows; ++i) pair_rows<1>(W + i * in, in, xp, dots + i);
}
#endif

}  // namespace
}  // namespace sf
