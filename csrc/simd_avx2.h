// AVX2 + FMA building blocks shared by the *_avx2.cpp files (include only there). Without
// AVX-512's expand, a bitmap byte is decoded with a permutation table: the next popcount(m)
// values are loaded and vpermps moves value k to the lane of the k-th set bit; unset lanes are
// zeroed. All tables are constexpr (no run-time initialiser in an ISA-specific file).
#pragma once

#include <immintrin.h>

#include "common.h"

namespace sf {
namespace {
namespace v256 {

struct PermLut {
  int32_t idx[256][8];
  constexpr PermLut() : idx() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j) idx[m][j] = ((m >> j) & 1) ? k++ : 0;
    }
  }
};
struct FirstLut {
  int32_t lanes[9][8];
  constexpr FirstLut() : lanes() {
    for (int n = 0; n <= 8; ++n)
      for (int j = 0; j < 8; ++j) lanes[n][j] = j < n ? -1 : 0;
  }
};
// Like PermLut, but an unset lane takes lane 7: with the lanes past popcount(m) loaded as zero
// (masked load), a byte decodes in one vpermps and no zeroing step (m = 0xff sets every lane).
struct PermZLut {
  int32_t idx[256][8];
  constexpr PermZLut() : idx() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j) idx[m][j] = ((m >> j) & 1) ? k++ : 7;
    }
  }
};
constexpr PermLut kPerm{};
constexpr PermZLut kPermZ{};
constexpr FirstLut kFirst{};

inline __m256i first_lanes(int64_t n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kFirst.lanes[n >= 8 ? 8 : n]));
}

inline __m256 widen_bf16(__m128i raw) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)); }

inline __m256i idx8(const uint16_t* p) { return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256i idx8(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

template <VT V>
inline __m256 val8(const void* v, int64_t i) {
  if constexpr (V == VT::f32) {
    return _mm256_loadu_ps(static_cast<const float*>(v) + i);
  } else if constexpr (V == VT::i8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(v) + i))));
  } else {
    return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(v) + i)));
  }
}

// 2:4 at batch 1 gathers x instead of expanding the weights: index byte b holds two groups
// (8 columns, 4 stored values; nm.h) and kNm24Pos.idx[b] names the 4 columns (0-7) of its values,
// in lanes 0-3 and again in lanes 4-7, so vpermps of 8 x columns picks the x each value multiplies.
struct Nm24PosLut {
  int32_t idx[256][8];
  constexpr Nm24PosLut() : idx() {
    for (int v = 0; v < 256; ++v) {
      const int g0 = v & 15, g1 = v >> 4;
      const int pos[4] = {g0 & 3, g0 >> 2, 4 + (g1 & 3), 4 + (g1 >> 2)};
      for (int k = 0; k < 4; ++k) idx[v][k] = idx[v][k + 4] = pos[k];
    }
  }
};
constexpr Nm24PosLut kNm24Pos{};

inline __m256i nm24_pos(uint8_t b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kNm24Pos.idx[b])); }

// the x of 16 columns [c, c + 16) (x points at column c) at the 8 stored values of index bytes ib[0], ib[1]
inline __m256 nm24_x16(const float* x, const uint8_t* ib) {
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), nm24_pos(ib[0]));
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8), nm24_pos(ib[1]));
  return _mm256_blend_ps(lo, hi, 0xF0);
}

// Batch-1 row walk state (common.h walk_row_pairs): the row's bitmap / index bytes, its next stored
// value and two accumulators.
struct RowWalk {
  const uint8_t* bits;
  int64_t vp;
  __m256 a0, a1;
};

// the first n (<= 8) values from i, zero lanes after them (reads only those n)
template <VT V>
inline __m256 val8_n(const void* v, int64_t i, int64_t n) {
  if constexpr (V == VT::f32) {
    return _mm256_maskload_ps(static_cast<const float*>(v) + i, first_lanes(n));
  } else {
    uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (n) std::memcpy(tmp, static_cast<const uint16_t*>(v) + i, static_cast<size_t>(n) * 2);
    return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Software prefetch for the batch-1 row kernels, bytes ahead in each stream (see simd_avx512.h).
constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch(const void* p, int64_t byte_offset) {
  _mm_prefetch(static_cast<const char*>(p) + byte_offset, _MM_HINT_T0);
}
template <VT V>
constexpr int64_t val_bytes() { return V == VT::f32 ? 4 : V == VT::bf16 ? 2 : 1; }

inline void prefetch_l2(const void* p, int64_t byte_offset) {
  _mm_prefetch(static_cast<const char*>(p) + byte_offset, _MM_HINT_T1);
}

// Dense 8-lane weights for byte mask m: the next popcount(m) values from vp at the set lanes, zeros
// elsewhere, in one masked load (or bf16 load and AND) and one vpermps through kPermZ. `safe`: 8
// values from vp are inside the buffer (bf16 then reads 8 unmasked).
template <VT V>
inline __m256 expand8(const void* v, int64_t vp, unsigned m, bool safe) {
  const __m256i lanes = first_lanes(__builtin_popcount(m));
  __m256 w;
  if constexpr (V == VT::f32) {
    w = _mm256_maskload_ps(static_cast<const float*>(v) + vp, lanes);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(v) + vp;
    __m128i raw;
    if (safe) {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    } else {
      uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const int pc = __builtin_popcount(m);
      if (pc) std::memcpy(tmp, src, static_cast<size_t>(pc) * 2);  // src may be null for an empty buffer
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    w = _mm256_and_ps(widen_bf16(raw), _mm256_castsi256_ps(lanes));
  }
  return _mm256_permutevar8x32_ps(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kPermZ.idx[m])));
}

// acc[nb] += sum over k in [0, count) of val[v0 + k] * x_nb[idx[k]]; the < 8 leftover entries go
// to the scalar sums tail[nb].
template <class I, VT V, int NB>
inline void gather_dot(const I* idx, const void* val, int64_t v0, int64_t count, const float* const* xs, __m256* a0,
                       __m256* a1, float* tail) {
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {
    prefetch(idx + k, kPrefetchBytes);
    prefetch(static_cast<const char*>(val) + (v0 + k) * val_bytes<V>(), kPrefetchBytes);
    const __m256i i0 = idx8(idx + k), i1 = idx8(idx + k + 8);
    const __m256 w0 = val8<V>(val, v0 + k), w1 = val8<V>(val, v0 + k + 8);
    for (int nb = 0; nb < NB; ++nb) {
      a0[nb] = _mm256_fmadd_ps(w0, _mm256_i32gather_ps(xs[nb], i0, 4), a0[nb]);
      a1[nb] = _mm256_fmadd_ps(w1, _mm256_i32gather_ps(xs[nb], i1, 4), a1[nb]);
    }
  }
  if (k + 8 <= count) {
    const __m256i i0 = idx8(idx + k);
    const __m256 w0 = val8<V>(val, v0 + k);
    for (int nb = 0; nb < NB; ++nb) a0[nb] = _mm256_fmadd_ps(w0, _mm256_i32gather_ps(xs[nb], i0, 4), a0[nb]);
    k += 8;
  }
  for (; k < count; ++k) {
    const float wv = load_val<V>(val, v0 + k);
    const int64_t j = static_cast<int64_t>(idx[k]);
    for (int nb = 0; nb < NB; ++nb) tail[nb] += wv * xs[nb][j];
  }
}

}  // namespace v256
}  // namespace
}  // namespace sf
