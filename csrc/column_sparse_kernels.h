// Column-sparse linear kernels (column_sparse.h), written once with the native vector of the
// including file (lanes.h: zmm in column_sparse_avx512.cpp, ymm in column_sparse_avx2.cpp, SSE in
// column_sparse.cpp). Internal linkage throughout; kColumnSparseKernels is the including file's
// ColumnSparseKernels.
//
// Both kernels walk a channel's 64-bit bitmap words in chunks of kVL columns; `expand` turns the
// chunk's bits m and the channel's next popcount(m) packed values into a vector with the values in
// the set lanes and 0 elsewhere:
//   AVX-512: float32 vexpandps from memory; bfloat16 16 values loaded (a masked load of exactly
//            popcount(m) at the buffer's end), widened to float32, then vexpandps between registers;
//   AVX2:    a 256-entry table of vpermps indices and lane masks; the packed values come from a
//            masked load (float32: zeros past popcount(m), so one vpermps through kPermZ and no mask)
//            or, for bfloat16, a 16-byte load while 8 values remain in the buffer and a scalar copy
//            at its very end (then the vpermps and an AND with the lane mask);
//   SSE:     the set lanes filled one by one.
// int8 values are widened to float32 before the expansion (AVX-512: 16 bytes or a masked load of
// popcount(m), vpmovsxbd + vcvtdq2ps; AVX2: 8 bytes or a scalar copy at the buffer's end); the
// kernels then sum x_i * q and the driver applies the row scales (column_sparse.h).
// gemv_tile: G active channels per pass over the tile: per vector of outputs one load and one store
//   of the partial sums (in L1) and G expansions + FMAs. AVX-512 float32 values: G = 8 on plain
//   pointers (gemv_group_f32); bfloat16 values in the AVX512_VBMI2 build (column_sparse_avx512vbmi2.cpp):
//   G = 8, one vpexpandw per 32 outputs (gemv_group_bf16, partial sums as even / odd outputs inside
//   the tile); AVX2 float32 values G = 8 through `expand` (half the partial-sum loads and stores of
//   G = 4: 4-layer 4096<->11008 stack, 50% weights, Zen 3, alternating builds, 24.4 / 24.6 -> 21.6 /
//   17.0 ms at 50% activation sparsity); everything else G = 4 through `expand`. Both G = 8 walks read the group's bits from
//   rows staged side by side (stage_bits) and, while they walk, prefetch the first kLeadBytes of the
//   next group's value runs (a run then starts without a demand miss; most of a narrow layer's run).
// decode_panel: the expanded vectors of each channel stored into a dense panel row.
#pragma once

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cstring>

#include "column_sparse.h"
#include "lanes.h"
#include "sparse_input_kernels.h"  // si_load, si_store, si_fma, si_bcast
#if defined(__AVX2__) && !defined(__AVX512F__)
#include "simd_avx2.h"  // the expansion tables (only the AVX2 build includes it)
#endif

namespace sf {
namespace {

alignas(64) constexpr float kZeros[16] = {};
constexpr uint64_t kChunkMask = kVL == 64 ? ~0ull : (1ull << kVL) - 1;

#if defined(__AVX2__) && !defined(__AVX512F__)
// For an 8-bit mask m: lane[m][l] = all ones where bit l is set. The permutation tables (v256::kPerm,
// v256::kPermZ) and the first-c-lanes masks (v256::first_lanes) are simd_avx2.h's.
struct LaneLut {
  int32_t lane[256][8];
  constexpr LaneLut() : lane() {
    for (int m = 0; m < 256; ++m)
      for (int l = 0; l < 8; ++l) lane[m][l] = ((m >> l) & 1) ? -1 : 0;
  }
};
constexpr LaneLut kLanes{};
#endif

#if defined(__AVX512F__)
// int8 values [pos, pos + popcount(m)) widened to float32 in lanes 0.. (16 bytes while the buffer
// has them, else a masked load of exactly popcount(m); the lanes past popcount(m) are unused)
inline __m512 widen_i8(const void* values, int64_t pos, int64_t end, uint32_t m) {
  const int8_t* p = static_cast<const int8_t*>(values) + pos;
  const __m128i h = pos + 16 <= end ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                    : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << __builtin_popcount(m)) - 1u), p);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h));
}
#endif

// The chunk's vector: lane l = values[pos + rank of bit l in m] where bit l of m is set, else 0.
// `end` = the number of values in the buffer (reads never go past it).
template <VT V>
inline vfl expand(const void* values, int64_t pos, int64_t end, uint32_t m) {
#if defined(__AVX512F__)
  if constexpr (V == VT::f32) {
    (void)end;
    return reinterpret_cast<vfl>(_mm512_maskz_expandloadu_ps(static_cast<__mmask16>(m),
                                                             static_cast<const float*>(values) + pos));
  } else if constexpr (V == VT::i8) {
    return reinterpret_cast<vfl>(_mm512_maskz_expand_ps(static_cast<__mmask16>(m), widen_i8(values, pos, end, m)));
  } else {
    // 16 values when the buffer has them (the expansion uses only the first popcount(m)), else a
    // masked load of exactly popcount(m)
    const uint16_t* p = static_cast<const uint16_t*>(values) + pos;
    const __m256i h = pos + 16 <= end ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                      : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << __builtin_popcount(m)) - 1u), p);
    const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return reinterpret_cast<vfl>(_mm512_maskz_expand_ps(static_cast<__mmask16>(m), f));
  }
#elif defined(__AVX2__)
  const int c = __builtin_popcount(m);
  __m256 packed;
  if constexpr (V == VT::f32) {
    packed = _mm256_maskload_ps(static_cast<const float*>(values) + pos, v256::first_lanes(c));
    return reinterpret_cast<vfl>(
        _mm256_permutevar8x32_ps(packed, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v256::kPermZ.idx[m]))));
  } else if constexpr (V == VT::i8) {
    const int8_t* p = static_cast<const int8_t*>(values) + pos;
    __m128i h;
    if (pos + 8 <= end) {
      h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) int8_t tmp[16] = {};
      for (int l = 0; l < c; ++l) tmp[l] = p[l];
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    packed = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(values) + pos;
    __m128i h;
    if (pos + 8 <= end) {
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int l = 0; l < c; ++l) tmp[l] = p[l];
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    packed = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  const __m256 e = _mm256_permutevar8x32_ps(packed, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v256::kPerm.idx[m])));
  return reinterpret_cast<vfl>(
      _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanes.lane[m])))));
#else
  (void)end;
  vfl v = si_load(kZeros);
  int r = 0;
  for (int l = 0; l < kVL; ++l) {
    if ((m >> l) & 1u) v[l] = load_val<V>(values, pos + r++);
  }
  return v;
#endif
}

#if defined(__AVX512F__)
typedef uint16_t u16_alias __attribute__((may_alias));

// expand<V> with the chunk's 16 bits read from the bitmap in memory: kmovw from memory (a load
// uop) instead of a shift and a kmovw from a general register (port 5, which vexpandps needs too)
template <VT V>
inline vfl expand_at(const void* values, int64_t pos, int64_t end, const u16_alias* bits) {
  __mmask16 k;
  // an explicit memory operand: the compiler would otherwise reuse the general-register copy that
  // the popcount of the same bits loads, and move it over with a port-5 kmovw
  asm("kmovw %1, %0" : "=k"(k) : "m"(*bits));
  if constexpr (V == VT::f32) {
    (void)end;
    return reinterpret_cast<vfl>(_mm512_maskz_expandloadu_ps(k, static_cast<const float*>(values) + pos));
  } else if constexpr (V == VT::i8) {
    return reinterpret_cast<vfl>(_mm512_maskz_expand_ps(k, widen_i8(values, pos, end, *bits)));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(values) + pos;
    const __m256i h = pos + 16 <= end ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                      : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << __builtin_popcount(*bits)) - 1u), p);
    const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return reinterpret_cast<vfl>(_mm512_maskz_expand_ps(k, f));
  }
}
#endif

// acc[0:round64(cw)] += sum over G channels (int8: of the unscaled q) of xv[g] * W[j0:, idx[g]]
template <VT V, int G>
inline void gemv_group(const ColumnSparseWeight& w, const int32_t* idx, const float* xv, int64_t j0, int64_t cw,
                       float* acc) {
  const int64_t words = w.words(), nblk = w.nblk();
  const uint64_t* bm[G];
  int64_t pos[G];
  vfl xk[G];
  for (int g = 0; g < G; ++g) {
    bm[g] = w.bitmap + idx[g] * words + j0 / 64;
    pos[g] = w.block_ptr[idx[g] * nblk + j0 / kColBlock];
    xk[g] = si_bcast(xv + g);
  }
  const int64_t nw = (cw + 63) / 64;
  for (int64_t q = 0; q < nw; ++q) {
#if !defined(__AVX512F__)
    uint64_t word[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) word[g] = bm[g][q];
#endif
    float* a = acc + q * 64;
#pragma GCC unroll 16
    for (int c = 0; c < 64; c += kVL) {
      vfl v = si_load(a + c);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
#if defined(__AVX512F__)
        const u16_alias* bits = reinterpret_cast<const u16_alias*>(bm[g] + q) + c / 16;  // little endian
        v = si_fma(xk[g], expand_at<V>(w.values, pos[g], w.nnz, bits), v);
        pos[g] += __builtin_popcount(*bits);
#else
        const uint32_t m = static_cast<uint32_t>((word[g] >> c) & kChunkMask);
        v = si_fma(xk[g], expand<V>(w.values, pos[g], w.nnz, m), v);
        pos[g] += __builtin_popcount(m);
#endif
      }
      si_store(a + c, v);
    }
  }
}

// The most output columns a GEMV tile spans (column_sparse.cpp: kPartTile), and its bitmap words per channel
constexpr int64_t kMaxTileColumns = 16 * kColBlock;
constexpr int64_t kMaxTileWords = kMaxTileColumns / 64;

// The G channels' bitmap rows over the tile copied side by side into `stage` (G rows of
// kMaxTileWords words): read in one burst, and the walk then addresses every channel's bits from one
// base register (stage + g * row + c), leaving the general registers to the G value pointers.
template <int G>
inline void stage_bits(const ColumnSparseWeight& w, const int32_t* idx, int64_t j0, int64_t cw, uint64_t* stage) {
  const int64_t words = w.words(), nw = (cw + 63) / 64;
  for (int g = 0; g < G; ++g) {
    std::memcpy(stage + g * kMaxTileWords, w.bitmap + idx[g] * words + j0 / 64, static_cast<size_t>(nw) * 8);
  }
}

// at[0:n]: where the value runs of channels idx[0:n] start at output j0
template <class Val, int G>
inline void run_starts(const ColumnSparseWeight& w, const int32_t* idx, int n, int64_t j0, const Val* (&at)[G]) {
  for (int g = 0; g < n; ++g) {
    at[g] = static_cast<const Val*>(w.values) + w.block_ptr[idx[g] * w.nblk() + j0 / kColBlock];
  }
}

#if defined(__AVX512F__)
// AVX-512, float32 values: G channels walk their bitmap rows side by side, 16 outputs at a time.
// Per channel and 16 outputs: kmovw of the 16 bits from memory (a load, no port-5 move), one
// vexpandps from the channel's value pointer, one FMA, and the pointer advanced by popcount of the
// same 16 bits; per 16 outputs one load and one store of the partial sums for all G channels.
// The channels' bits are read from their staged rows (stage_bits: one base register for all G) and
// their values through plain pointers, so all G walks stay in registers; chunks go in pairs, and the
// first of each pair (about one line of values at 50% density) prefetches the line kPrefetchAhead
// bytes ahead in each channel's values: 3-6% more bytes/s on two cores streaming from memory (no
// gain for the bfloat16 walk below).
constexpr int64_t kPrefetchAhead = 512;

// The first kLeadBytes of each of the next group's value runs are prefetched while this group walks
// (one line per channel and chunk pair), so a run starts without a demand miss: the walk's own
// prefetch only reaches kPrefetchAhead bytes into a run, and narrow layers' runs are short (a 512-output
// tile at 50% weights: 1 KB).
constexpr int64_t kLeadBytes = kPrefetchAhead;

// next[0:ahead] the next group's channels (ahead <= G; 0: none)
template <int G>
inline void gemv_group_f32(const ColumnSparseWeight& w, const int32_t* idx, const float* xv, int64_t j0, int64_t cw,
                           float* acc, const int32_t* next = nullptr, int ahead = 0) {
  const float* lead[G];
  run_starts(w, next, ahead, j0, lead);
  alignas(64) uint64_t stage[G * kMaxTileWords];
  stage_bits<G>(w, idx, j0, cw, stage);
  const u16_alias* bits = reinterpret_cast<const u16_alias*>(stage);  // channel g's chunk c: bits[g * kRow + c]
  constexpr int64_t kRow = kMaxTileWords * 4;
  const float* val[G];
  run_starts(w, idx, G, j0, val);
  __m512 xk[G];
  for (int g = 0; g < G; ++g) xk[g] = _mm512_set1_ps(xv[g]);
  const int64_t chunks = (cw + 63) / 64 * 4;  // 16-output chunks, a multiple of 4
  for (int64_t c = 0; c < chunks; c += 2) {
    __m512 v0 = _mm512_loadu_ps(acc + c * 16), v1 = _mm512_loadu_ps(acc + c * 16 + 16);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      __mmask16 k0, k1;
      asm("kmovw %1, %0" : "=k"(k0) : "m"(bits[g * kRow + c]));  // from memory (see expand_at)
      v0 = _mm512_fmadd_ps(xk[g], _mm512_maskz_expandloadu_ps(k0, val[g]), v0);
      _mm_prefetch(reinterpret_cast<const char*>(val[g]) + kPrefetchAhead, _MM_HINT_T0);
      val[g] += __builtin_popcount(bits[g * kRow + c]);
      asm("kmovw %1, %0" : "=k"(k1) : "m"(bits[g * kRow + c + 1]));
      v1 = _mm512_fmadd_ps(xk[g], _mm512_maskz_expandloadu_ps(k1, val[g]), v1);
      val[g] += __builtin_popcount(bits[g * kRow + c + 1]);
    }
    _mm512_storeu_ps(acc + c * 16, v0);
    _mm512_storeu_ps(acc + c * 16 + 16, v1);
    if (c * 32 < kLeadBytes) {  // pair c / 2: line c / 2 of each next run
      for (int g = 0; g < ahead; ++g) _mm_prefetch(reinterpret_cast<const char*>(lead[g]) + c * 32, _MM_HINT_T0);
    }
  }
}
#endif

#if defined(__AVX512VBMI2__)
typedef uint32_t u32_alias __attribute__((may_alias));

// AVX512_VBMI2, bfloat16 values (bits from the staged rows and the next group's lead-in prefetch, as
// gemv_group_f32): one vpexpandw from memory places the channel's next popcount(m) values into the
// set lanes of 32 outputs (m = the 32 bits, kmovd from memory); the 32-bit lanes then hold output
// pairs, and a shift (even outputs: bits << 16) and a mask (odd outputs: the high halves) widen them
// to float32 without a shuffle. The partial sums of each 32
// outputs are therefore kept as 16 even then 16 odd outputs (to_even_odd / from_even_odd around the
// tile). Per channel and 32 outputs: 1 port-5 uop (the expansion), against 4 for two widenings and
// two vexpandps.
template <int G>
inline void gemv_group_bf16(const ColumnSparseWeight& w, const int32_t* idx, const float* xv, int64_t j0, int64_t cw,
                            float* acc, const int32_t* next = nullptr, int ahead = 0) {
  const uint16_t* lead[G];
  run_starts(w, next, ahead, j0, lead);
  alignas(64) uint64_t stage[G * kMaxTileWords];
  stage_bits<G>(w, idx, j0, cw, stage);
  const u32_alias* bits = reinterpret_cast<const u32_alias*>(stage);  // channel g's chunk c: bits[g * kRow + c]
  constexpr int64_t kRow = kMaxTileWords * 2;
  const uint16_t* val[G];
  run_starts(w, idx, G, j0, val);
  __m512 xk[G];
  for (int g = 0; g < G; ++g) xk[g] = _mm512_set1_ps(xv[g]);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t chunks = (cw + 63) / 64 * 2;  // 32-output chunks
  for (int64_t c = 0; c < chunks; ++c) {
    __m512 even = _mm512_loadu_ps(acc + c * 32), odd = _mm512_loadu_ps(acc + c * 32 + 16);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      __mmask32 k;
      asm("kmovd %1, %0" : "=k"(k) : "m"(bits[g * kRow + c]));
      const __m512i e = _mm512_maskz_expandloadu_epi16(k, val[g]);  // 32 bf16: outputs 2d (low), 2d + 1 (high)
      even = _mm512_fmadd_ps(xk[g], _mm512_castsi512_ps(_mm512_slli_epi32(e, 16)), even);
      odd = _mm512_fmadd_ps(xk[g], _mm512_castsi512_ps(_mm512_and_si512(e, high)), odd);
      val[g] += __builtin_popcount(bits[g * kRow + c]);
    }
    _mm512_storeu_ps(acc + c * 32, even);
    _mm512_storeu_ps(acc + c * 32 + 16, odd);
    if (c * 64 < kLeadBytes) {  // chunk c: line c of each next run (as gemv_group_f32)
      for (int g = 0; g < ahead; ++g) _mm_prefetch(reinterpret_cast<const char*>(lead[g]) + c * 64, _MM_HINT_T0);
    }
  }
}

// acc[0:n] (n a multiple of 32): each 32 outputs reordered as the 16 even then the 16 odd ones
inline void to_even_odd(float* acc, int64_t n) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t j = 0; j < n; j += 32) {
    const __m512 a = _mm512_loadu_ps(acc + j), b = _mm512_loadu_ps(acc + j + 16);
    _mm512_storeu_ps(acc + j, _mm512_permutex2var_ps(a, ev, b));
    _mm512_storeu_ps(acc + j + 16, _mm512_permutex2var_ps(a, od, b));
  }
}

// the inverse of to_even_odd
inline void from_even_odd(float* acc, int64_t n) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t j = 0; j < n; j += 32) {
    const __m512 e = _mm512_loadu_ps(acc + j), o = _mm512_loadu_ps(acc + j + 16);
    _mm512_storeu_ps(acc + j, _mm512_permutex2var_ps(e, lo, o));
    _mm512_storeu_ps(acc + j + 16, _mm512_permutex2var_ps(e, hi, o));
  }
}
#endif

// The group walk of this file for values V: the AVX-512 float32 and VBMI2 bfloat16 walks above
// where compiled, else gemv_group.
template <VT V, int G>
inline void gemv_group_best(const ColumnSparseWeight& w, const int32_t* idx, const float* xv, int64_t j0, int64_t cw,
                            float* acc) {
#if defined(__AVX512VBMI2__)
  if constexpr (V == VT::bf16) {
    gemv_group_bf16<G>(w, idx, xv, j0, cw, acc);
    return;
  }
#endif
#if defined(__AVX512F__)
  if constexpr (V == VT::f32) {
    gemv_group_f32<G>(w, idx, xv, j0, cw, acc);
    return;
  }
#endif
  gemv_group<V, G>(w, idx, xv, j0, cw, acc);
}

// channels per group: 8 for the AVX-512 float32 and VBMI2 bfloat16 walks (fewer partial-sum loads
// and stores per value), else 4
template <VT V>
constexpr int group_channels() {
#if defined(__AVX512VBMI2__)
  if (V == VT::bf16) return 8;
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
  if (V == VT::f32) return 8;
#endif
  return 4;
}

template <VT V>
void gemv_tile_t(const ColumnSparseWeight& w, const int32_t* idx, const float* xv, int64_t n, int64_t j0, int64_t cw,
                 float* acc) {
  constexpr int G = group_channels<V>();
#if defined(__AVX512VBMI2__)
  if constexpr (V == VT::bf16) to_even_odd(acc, (cw + 63) / 64 * 64);
#endif
  int64_t k = 0;
#if defined(__AVX512F__)
  if constexpr (V == VT::f32) {  // with the next group's lead-in prefetch
    for (; k + G <= n; k += G) {
      gemv_group_f32<G>(w, idx + k, xv + k, j0, cw, acc, idx + k + G, static_cast<int>(min64(G, n - k - G)));
    }
  }
#endif
#if defined(__AVX512VBMI2__)
  if constexpr (V == VT::bf16) {
    for (; k + G <= n; k += G) {
      gemv_group_bf16<G>(w, idx + k, xv + k, j0, cw, acc, idx + k + G, static_cast<int>(min64(G, n - k - G)));
    }
  }
#endif
  for (; k + G <= n; k += G) gemv_group_best<V, G>(w, idx + k, xv + k, j0, cw, acc);
  if constexpr (G > 4) {
    for (; k + 4 <= n; k += 4) gemv_group_best<V, 4>(w, idx + k, xv + k, j0, cw, acc);
  }
  for (; k < n; ++k) gemv_group_best<V, 1>(w, idx + k, xv + k, j0, cw, acc);
#if defined(__AVX512VBMI2__)
  if constexpr (V == VT::bf16) from_even_odd(acc, (cw + 63) / 64 * 64);
#endif
}

void gemv_tile_impl(const ColumnSparseWeight& w, const int32_t* idx, const float* xv, int64_t n, int64_t j0,
                    int64_t cw, float* acc) {
  if (w.vt == VT::f32) {
    gemv_tile_t<VT::f32>(w, idx, xv, n, j0, cw, acc);
  } else if (w.vt == VT::i8) {
    gemv_tile_t<VT::i8>(w, idx, xv, n, j0, cw, acc);
  } else {
    gemv_tile_t<VT::bf16>(w, idx, xv, n, j0, cw, acc);
  }
}

template <VT V>
void decode_panel_t(const ColumnSparseWeight& w, int64_t k0, int64_t k1, int64_t j0, int64_t cw, float* panel,
                    int64_t ld) {
  const int64_t words = w.words(), nblk = w.nblk(), nw = (cw + 63) / 64;
  for (int64_t k = k0; k < k1; ++k) {
    const uint64_t* bm = w.bitmap + k * words + j0 / 64;
    int64_t pos = w.block_ptr[k * nblk + j0 / kColBlock];
    float* row = panel + (k - k0) * ld;
    for (int64_t q = 0; q < nw; ++q) {
      const uint64_t word = bm[q];
#pragma GCC unroll 16
      for (int c = 0; c < 64; c += kVL) {
        const uint32_t m = static_cast<uint32_t>((word >> c) & kChunkMask);
        si_store(row + q * 64 + c, expand<V>(w.values, pos, w.nnz, m));
        pos += __builtin_popcount(m);
      }
    }
  }
}

void decode_panel_impl(const ColumnSparseWeight& w, int64_t k0, int64_t k1, int64_t j0, int64_t cw, float* panel,
                       int64_t ld) {
  if (w.vt == VT::f32) {
    decode_panel_t<VT::f32>(w, k0, k1, j0, cw, panel, ld);
  } else if (w.vt == VT::i8) {
    decode_panel_t<VT::i8>(w, k0, k1, j0, cw, panel, ld);
  } else {
    decode_panel_t<VT::bf16>(w, k0, k1, j0, cw, panel, ld);
  }
}

constexpr ColumnSparseKernels kColumnSparseKernels{gemv_tile_impl, decode_panel_impl};

}  // namespace
}  // namespace sf
