// AVX-512 building blocks shared by the *_avx512.cpp files (include only there: they need
// -mavx512f -mavx512bw -mavx512vl -mavx512dq). Internal linkage throughout.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "common.h"

namespace sf {
namespace {
namespace v512 {

// 16 column indices -> int32 lanes
inline __m512i idx16(const uint16_t* p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512i idx16(const int32_t* p) { return _mm512_loadu_si512(p); }
inline __m512i idx16(const uint16_t* p, __mmask16 k) { return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)); }
inline __m512i idx16(const int32_t* p, __mmask16 k) { return _mm512_maskz_loadu_epi32(k, p); }

inline __m512 widen_bf16(__m256i raw) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)); }

// 16 consecutive stored values as float32
template <VT V>
inline __m512 val16(const void* v, int64_t i) {
  if constexpr (V == VT::f32) {
    return _mm512_loadu_ps(static_cast<const float*>(v) + i);
  } else if constexpr (V == VT::i8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(v) + i))));
  } else {
    return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(v) + i)));
  }
}
template <VT V>
inline __m512 val16(const void* v, int64_t i, __mmask16 k) {
  if constexpr (V == VT::f32) {
    return _mm512_maskz_loadu_ps(k, static_cast<const float*>(v) + i);
  } else if constexpr (V == VT::i8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, static_cast<const int8_t*>(v) + i)));
  } else {
    return widen_bf16(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(v) + i));
  }
}

// Byte indices for vpermps: kPrefix.b8[m] holds, in byte j, the number of set bits of m below
// bit j (the position of column j's value among the byte's kept values).
struct PrefixLut {
  uint64_t b8[256];
  constexpr PrefixLut() : b8() {
    for (int m = 0; m < 256; ++m) {
      uint64_t b = 0;
      int k = 0;
      for (int j = 0; j < 8; ++j) {
        if ((m >> j) & 1) b |= static_cast<uint64_t>(k++) << (8 * j);
      }
      b8[m] = b;
    }
  }
};
constexpr PrefixLut kPrefix{};

#if defined(__AVX512VPOPCNTDQ__)
// Lane i of a 16-bit slice: the bits below it (kBelow), the bit itself (kBit); the *Hi forms are
// for the upper slice of a 32-bit word.
inline __m512i below_lanes(bool hi) {
  const __m512i b = _mm512_set_epi32(0x7fff, 0x3fff, 0x1fff, 0xfff, 0x7ff, 0x3ff, 0x1ff, 0xff, 0x7f, 0x3f, 0x1f, 0xf, 7, 3, 1, 0);
  return hi ? _mm512_slli_epi32(b, 16) : b;
}
inline __m512i bit_lanes(bool hi) { return _mm512_add_epi32(below_lanes(hi), _mm512_set1_epi32(hi ? 0x10000 : 1)); }
#endif

// Dense 16-lane weights for mask m, like vexpandps but through vpermps: lane j takes stored value
// number popcount(m below j). The permutation indices come from vpopcntd where the file is built
// with AVX512_VPOPCNTDQ (*_avx512vp.cpp), else from a lookup table per byte. On the Zen 5 this
// was tuned on, vexpandps (memory or register form) costs ~15 cycles per 64 columns, the table +
// vpermps ~10, vpopcntd + vpermps ~6-7 (see docs/kernels.md). `safe`: 16 values can be read at vp
// without leaving the buffer; otherwise only popcount(m) are read (masked load).
template <VT V>
inline __m512 decode16(const void* v, int64_t vp, uint32_t m, bool safe) {
#if defined(__AVX512VPOPCNTDQ__)
  const __m512i idx = _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32(static_cast<int32_t>(m)), below_lanes(false)));
#else
  const uint32_t lo = m & 0xffu, hi = (m >> 8) & 0xffu;
  const uint64_t pl = static_cast<uint64_t>(__builtin_popcount(lo));
  const __m128i b = _mm_insert_epi64(_mm_cvtsi64_si128(static_cast<long long>(kPrefix.b8[lo])),
                                     static_cast<long long>(kPrefix.b8[hi] + pl * 0x0101010101010101ULL), 1);
  const __m512i idx = _mm512_cvtepu8_epi32(b);
#endif
  __m512 vals;
  if (safe) {
    vals = val16<V>(v, vp);
  } else {
    vals = val16<V>(v, vp, static_cast<__mmask16>((1u << __builtin_popcount(m)) - 1u));
  }
  return _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(m), idx, vals);
}

#if defined(__AVX512VPOPCNTDQ__)
// decode16 of 16-bit slice s (0..3) of the 64-bit bitmap word at `word`, the slice broadcast
// straight from memory (no general-register -> vector moves: ~6.5 vs ~7.5 cycles per 64 columns).
// m: the slice's bits (only its popcount is used, when !safe).
template <VT V>
inline __m512 decode16_word(const void* v, int64_t vp, const uint8_t* word, int s, uint32_t m, bool safe) {
  int32_t half;
  std::memcpy(&half, word + (s >> 1) * 4, 4);
  const __m512i d = _mm512_set1_epi32(half);
  const bool hi = (s & 1) != 0;
  const __m512i idx = _mm512_popcnt_epi32(_mm512_and_si512(d, below_lanes(hi)));
  const __mmask16 k = _mm512_test_epi32_mask(d, bit_lanes(hi));
  const __m512 vals = safe ? val16<V>(v, vp) : val16<V>(v, vp, static_cast<__mmask16>((1u << __builtin_popcount(m)) - 1u));
  return _mm512_maskz_permutexvar_ps(k, idx, vals);
}
#endif

// Dense 16-lane weight vector for mask m: the next popcount(m) stored values placed at the set
// lanes, zeros elsewhere (vexpandps decodes a bitmap straight into a register).
template <VT V>
inline __m512 expand16(const void* v, int64_t vp, __mmask16 m) {
  if constexpr (V == VT::f32) {
    return _mm512_maskz_expandloadu_ps(m, static_cast<const float*>(v) + vp);
  } else {
    const unsigned pc = static_cast<unsigned>(__builtin_popcount(m));
    const __mmask16 first = static_cast<__mmask16>((1u << pc) - 1u);
    return _mm512_maskz_expand_ps(m, widen_bf16(_mm256_maskz_loadu_epi16(first, static_cast<const uint16_t*>(v) + vp)));
  }
}

// Software prefetch distance for the batch-1 row kernels, in bytes of each stream (values, column
// indices, bitmap) ahead of the current position. Without it the batch-1 kernels ran at about
// compute time + memory time (the hardware prefetcher stops at 4 KB pages and did not hide the
// DRAM latency); with it they approach max(compute, memory). Prefetches never fault, so running
// past the end of a buffer is harmless.
#ifndef SF_PREFETCH_BYTES
#define SF_PREFETCH_BYTES 4096
#endif
constexpr int64_t kPrefetchBytes = SF_PREFETCH_BYTES;
inline void prefetch(const void* p, int64_t byte_offset) {
  _mm_prefetch(static_cast<const char*>(p) + byte_offset, _MM_HINT_T0);
}
inline void prefetch_l2(const void* p, int64_t byte_offset) {
  _mm_prefetch(static_cast<const char*>(p) + byte_offset, _MM_HINT_T1);
}
template <VT V>
constexpr int64_t val_bytes() { return V == VT::f32 ? 4 : V == VT::bf16 ? 2 : 1; }

inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : ((1u << n) - 1u)); }

// Prefetch of the stream a lanes row will read for its next column tile (the rows of a block
// take turns, so the hardware prefetcher sees dozens of short streams): `bytes` from p.
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// The same for the collects whose entry count per tile varies (CSR, bitmap): a fixed span of
// kBytes, sized for the ~64 entries per (row, tile) the driver aims at plus slack. Looping over the
// data-dependent count instead mispredicted its exit often enough to cost a third of the time at
// 90% sparsity with 128-column tiles (8.3 -> 5.4 TSC cycles per stored weight; 256 columns 4.8 -> 4.5).
template <int64_t kBytes>
inline void prefetch_ahead(const void* p) {
  for (int64_t o = 0; o < kBytes; o += 64) _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T0);
}
constexpr int64_t kAheadEntries = 80;

// Appends the columns c0 + (set bits of the 16-bit mask m) to idx[n...]; returns the new n.
// Writes 16 int32 at idx + n whatever popcount(m) is (callers leave 16 entries of slack).
inline int64_t append_cols(int32_t* idx, int64_t n, __m512i c0, uint32_t m) {
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(static_cast<__mmask16>(m), _mm512_add_epi32(c0, iota)));
  return n + __builtin_popcount(m);
}

// acc[nb] += sum over k in [0, count) of val[v0 + k] * x_nb[idx[k]]  (gathers x, streams values)
template <class I, VT V, int NB>
inline void gather_dot(const I* idx, const void* val, int64_t v0, int64_t count, const float* const* xs, __m512* a0,
                       __m512* a1) {
  int64_t k = 0;
  for (; k + 32 <= count; k += 32) {
    prefetch(idx + k, kPrefetchBytes);
    prefetch(static_cast<const char*>(val) + (v0 + k) * val_bytes<V>(), kPrefetchBytes);
    if constexpr (V == VT::f32) prefetch(static_cast<const float*>(val) + v0 + k + 16, kPrefetchBytes);
    const __m512i i0 = idx16(idx + k), i1 = idx16(idx + k + 16);
    const __m512 w0 = val16<V>(val, v0 + k), w1 = val16<V>(val, v0 + k + 16);
    for (int nb = 0; nb < NB; ++nb) {
      a0[nb] = _mm512_fmadd_ps(w0, _mm512_i32gather_ps(i0, xs[nb], 4), a0[nb]);
      a1[nb] = _mm512_fmadd_ps(w1, _mm512_i32gather_ps(i1, xs[nb], 4), a1[nb]);
    }
  }
  for (; k < count; k += 16) {
    const __mmask16 m = first_lanes(count - k);
    const __m512i i0 = idx16(idx + k, m);
    const __m512 w0 = val16<V>(val, v0 + k, m);
    for (int nb = 0; nb < NB; ++nb) {
      a0[nb] = _mm512_fmadd_ps(w0, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, xs[nb], 4), a0[nb]);
    }
  }
}

// One row of a batch-1 walk: its format bytes (bitmap or N:M index bytes), its running value
// offset and two accumulators (columns 0-15 and 16-31 of each 32-column step); the row state of
// walk_row_pairs (common.h).
struct RowWalk {
  const uint8_t* bits;
  int64_t vp;
  __m512 a0, a1;
};

}  // namespace v512
}  // namespace
}  // namespace sf
