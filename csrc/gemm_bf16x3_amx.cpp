// The AMX block of the bf16x3 GEMM (gemm_bf16x3.h). Tiles (palette 1, 16 rows x 64 bytes): 0-3 the
// float32 accumulators of a 32 x 32 output block (0: rows 0-15 x cols 0-15, 1: rows 16-31 x cols
// 0-15, 2: rows 0-15 x cols 16-31, 3: rows 16-31 x cols 16-31), 4 / 5 the A tiles of rows 0-15 /
// 16-31, 6 / 7 the B tiles of cols 0-15 / 16-31. Every packed tile is 1 KB contiguous (stride 64 B).
#include <immintrin.h>

#include "amx_tiles.h"
#include "gemm_bf16x3.h"

namespace sf {
namespace amx {

namespace {
inline void product(const uint16_t* a, const uint16_t* b, int64_t a_next, int64_t b_next, int64_t ks) {
  const uint16_t* a1 = a + a_next;
  const uint16_t* b1 = b + b_next;
  for (int64_t s = 0; s < ks; ++s) {
    const int64_t o = s * 512;
    _tile_loadd(4, a + o, 64);
    _tile_loadd(6, b + o, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, a1 + o, 64);
    _tile_dpbf16ps(1, 5, 6);
    _tile_loadd(7, b1 + o, 64);
    _tile_dpbf16ps(2, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
}
}  // namespace

void bf16x3_tiles_begin() { _tile_loadconfig(kAmxTiles16x64Config); }

void bf16x3_tiles_end() { _tile_release(); }

void bf16x3_block(const uint16_t* a_hi, const uint16_t* a_lo, const uint16_t* b_hi, const uint16_t* b_lo,
                  int64_t a_next, int64_t b_next, int64_t ks, float* acc, bool load) {
  if (load) {
    _tile_loadd(0, acc, 128);
    _tile_loadd(1, acc + 16 * 32, 128);
    _tile_loadd(2, acc + 16, 128);
    _tile_loadd(3, acc + 16 * 32 + 16, 128);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  product(a_hi, b_hi, a_next, b_next, ks);
  product(a_lo, b_hi, a_next, b_next, ks);
  product(a_hi, b_lo, a_next, b_next, ks);
  _tile_stored(0, acc, 128);
  _tile_stored(1, acc + 16 * 32, 128);
  _tile_stored(2, acc + 16, 128);
  _tile_stored(3, acc + 16 * 32 + 16, 128);
}

}  // namespace amx
}  // namespace sf

namespace sf {
namespace amx {

namespace {
// 16 floats -> hi / lo bf16 bits (the split of bf16x3_split_run)
inline void split16(const float* src, __m256i& hi, __m256i& lo) {
  const __m512 x = _mm512_loadu_ps(src);
  const __m256bh h = _mm512_cvtneps_pbh(x);
  const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
  const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(hf), _mm512_set1_ps(__builtin_inff()), _CMP_LT_OQ);
  hi = (__m256i)h;
  lo = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_sub_ps(finite, x, hf));
}
}  // namespace

// a full A tile (16 rows x 32 k) from rows of unit column stride (row stride rs floats)
void bf16x3_pack_a_tile(const float* src, int64_t rs, uint16_t* hi, uint16_t* lo) {
  for (int r = 0; r < 16; ++r) {
    for (int half = 0; half < 2; ++half) {
      __m256i h, l;
      split16(src + r * rs + half * 16, h, l);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + r * 32 + half * 16), h);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + r * 32 + half * 16), l);
    }
  }
}

// a full B tile (32 k x 16 columns) from rows of unit column stride: k pairs interleaved (VNNI)
void bf16x3_pack_b_tile(const float* src, int64_t rs, uint16_t* hi, uint16_t* lo) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int p = 0; p < 16; ++p) {
    __m256i h0, l0, h1, l1;
    split16(src + (2 * p) * rs, h0, l0);
    split16(src + (2 * p + 1) * rs, h1, l1);
    const __m512i h = _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1));
    const __m512i l = _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(l0), l1, 1));
    _mm512_storeu_si512(hi + p * 32, h);
    _mm512_storeu_si512(lo + p * 32, l);
  }
}

// n floats -> bf16 hi / lo bits with vcvtneps2bf16 (round to nearest even); lo of inf / NaN is 0
void bf16x3_split_run(const float* src, int64_t n, uint16_t* hi, uint16_t* lo) {
  int64_t i = 0;
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(src + i);
    const __m256bh h = _mm512_cvtneps_pbh(x);
    const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(hf), inf, _CMP_LT_OQ);
    const __m512 r = _mm512_maskz_sub_ps(finite, x, hf);
    const __m256bh l = _mm512_cvtneps_pbh(r);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + i), (__m256i)h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + i), (__m256i)l);
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(m, src + i);
    const __m256bh h = _mm512_cvtneps_pbh(x);
    const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(hf), inf, _CMP_LT_OQ);
    const __m256bh l = _mm512_cvtneps_pbh(_mm512_maskz_sub_ps(finite, x, hf));
    _mm256_mask_storeu_epi16(hi + i, m, (__m256i)h);
    _mm256_mask_storeu_epi16(lo + i, m, (__m256i)l);
  }
}

}  // namespace amx
}  // namespace sf
