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
//            masked load (float32) or, for bfloat16, a 16-byte load while 8 values remain in the
//            buffer and a scalar copy at its very end;
//   SSE:     the set lanes filled one by one.
// int8 values are widened to float32 before the expansion (AVX-512: 16 bytes or a masked load of
// popcount(m), vpmovsxbd + vcvtdq2ps; AVX2: 8 bytes or a scalar copy at the buffer's end); the
// kernels then sum x_i * q and the driver applies the row scales (column_sparse.h).
// gemv_tile: G = 4 active channels per pass over the tile: per vector of outputs one load and one
//   store of the partial sums (in L1) and four expansions + FMAs.
// decode_panel: the expanded vectors of each channel stored into a dense panel row.
#pragma once

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "column_sparse.h"
#include "lanes.h"
#include "sparse_input_kernels.h"  // si_load, si_store, si_fma, si_bcast

namespace sf {
namespace {

alignas(64) constexpr float kZeros[16] = {};
constexpr uint64_t kChunkMask = kVL == 64 ? ~0ull : (1ull << kVL) - 1;

#if defined(__AVX2__) && !defined(__AVX512F__)
// For an 8-bit mask m: perm[m][l] = the packed position lane l takes (its rank among the set bits),
// lane[m][l] = all ones where bit l is set.
struct ExpandTable {
  int32_t perm[256][8];
  int32_t lane[256][8];
  int32_t first[9][8];  // first[c][l] = all ones for l < c (masked load of c packed values)
};
constexpr ExpandTable make_expand_table() {
  ExpandTable t{};
  for (int m = 0; m < 256; ++m) {
    int r = 0;
    for (int l = 0; l < 8; ++l) {
      const bool set = (m >> l) & 1;
      t.perm[m][l] = set ? r : 0;
      t.lane[m][l] = set ? -1 : 0;
      r += set;
    }
  }
  for (int c = 0; c <= 8; ++c)
    for (int l = 0; l < 8; ++l) t.first[c][l] = l < c ? -1 : 0;
  return t;
}
constexpr ExpandTable kExpand = make_expand_table();
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
    packed = _mm256_maskload_ps(static_cast<const float*>(values) + pos,
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kExpand.first[c])));
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
  const __m256 e = _mm256_permutevar8x32_ps(packed, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kExpand.perm[m])));
  return reinterpret_cast<vfl>(
      _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kExpand.lane[m])))));
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

template <VT V>
void gemv_tile_t(const ColumnSparseWeight& w, const int32_t* idx, const float* xv, int64_t n, int64_t j0, int64_t cw,
                 float* acc) {
  constexpr int G = 4;
  int64_t k = 0;
  for (; k + G <= n; k += G) gemv_group<V, G>(w, idx + k, xv + k, j0, cw, acc);
  for (; k < n; ++k) gemv_group<V, 1>(w, idx + k, xv + k, j0, cw, acc);
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
