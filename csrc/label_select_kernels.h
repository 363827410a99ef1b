// Label scores of one (sequence, KV head) (label_select.h), written once with the native vector of
// the including file (lanes.h: zmm in label_select_avx512.cpp, ymm in label_select_avx2.cpp, SSE in
// label_select.cpp). Per 32-token block and kVL code bytes: the bytes widened to int32 (one vpmovzxbd on x86), the low and
// high nibbles (tokens j and j + 16) converted to float, minus 8, multiplied by the channel's query
// value and summed over the channels; then times the tokens' scales. The selection's kernel does the
// same and, in the same pass, turns each score into its rank key and counts the key's high 16 bits
// (label_select.h). Internal linkage throughout.
#pragma once

#include "label_select.h"
#include "lanes.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sf {
namespace {

typedef int32_t vi32_l __attribute__((vector_size(kVL * 4)));
typedef float vfl_l __attribute__((vector_size(kVL * 4), aligned(4)));
typedef uint32_t vu32 __attribute__((vector_size(kVL * 4)));
typedef uint32_t vu32_l __attribute__((vector_size(kVL * 4), aligned(4)));

// kVL code bytes widened to int32 lanes with one zero-extending load (vpmovzxbd: a
// __builtin_convertvector of a byte vector is lowered byte by byte)
inline vi32_l widen_bytes(const uint8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vi32_l>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return reinterpret_cast<vi32_l>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  vi32_l w;
  for (int i = 0; i < kVL; ++i) w[i] = p[i];
  return w;
#endif
}

// label_rank_key (label_select.h) lane by lane: s + 0 turns -0 into +0; NaN lanes all ones
inline vu32 rank_keys(vfl s) {
  s = s + 0.f;
  const vu32 u = reinterpret_cast<vu32>(s);
  const vu32 flip = reinterpret_cast<vu32>(reinterpret_cast<vi32_l>(u) >> 31) | 0x80000000u;
  return (u ^ flip) | reinterpret_cast<vu32>(s != s);
}

// the scores s of tokens [a, a + kVL) (a lane past n is dropped): written to out, their rank keys
// to keys, each key's high 16 bits counted in hist
inline void store_scores(vfl s, int64_t a, int64_t n, float* out, uint32_t* keys, int32_t* hist) {
  const vu32 k = rank_keys(s);
  if (a + kVL <= n) {
    *reinterpret_cast<vfl_l*>(out + a) = s;
    *reinterpret_cast<vu32_l*>(keys + a) = k;
    for (int i = 0; i < kVL; ++i) ++hist[k[i] >> 16];
  } else {
    for (int i = 0; i < kVL && a + i < n; ++i) {
      out[a + i] = s[i];
      keys[a + i] = k[i];
      ++hist[k[i] >> 16];
    }
  }
}

// the scores of one (b, h) into out; with keys (and hist), also the rank keys and the high-digit histogram
template <bool kKeys>
void label_row(const float* q, const uint8_t* codes, const float* scales, int64_t C, int64_t capb, int64_t n,
               float* out, uint32_t* keys, int32_t* hist) {
  for (int64_t t0 = 0; t0 < n; t0 += 32) {
    const uint8_t* blk = codes + t0 / 2;
    for (int64_t j = 0; j < 16; j += kVL) {
      vfl lo = vfl{}, hi = vfl{};
      for (int64_t c = 0; c < C; ++c) {
        const vi32_l w = widen_bytes(blk + c * capb + j);
        const vfl x = __builtin_convertvector(w & 15, vfl) - 8.f, y = __builtin_convertvector(w >> 4, vfl) - 8.f;
        lo += q[c] * x;
        hi += q[c] * y;
      }
      const int64_t a = t0 + j, b = t0 + 16 + j;  // first token of the low / high lanes
      if (kKeys) {
        if (a < n) store_scores(lo * *reinterpret_cast<const vfl_l*>(scales + a), a, n, out, keys, hist);
        if (b < n) store_scores(hi * *reinterpret_cast<const vfl_l*>(scales + b), b, n, out, keys, hist);
      } else if (b + kVL <= n) {
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

void label_scores_row_impl(const float* q, const uint8_t* codes, const float* scales, int64_t C, int64_t capb,
                           int64_t n, float* out) {
  label_row<false>(q, codes, scales, C, capb, n, out, nullptr, nullptr);
}

void label_keys_row_impl(const float* q, const uint8_t* codes, const float* scales, int64_t C, int64_t capb,
                         int64_t n, float* out, uint32_t* keys, int32_t* hist) {
  label_row<true>(q, codes, scales, C, capb, n, out, keys, hist);
}

}  // namespace
}  // namespace sf

// The kernel table of label_select.h for the including file's ISA: `namespace <isa> { SF_DEFINE_LABEL_SELECT_KERNELS }`.
#define SF_DEFINE_LABEL_SELECT_KERNELS                                            \
  extern const LabelScoreFn label_scores_row = label_scores_row_impl; \
  extern const LabelKeyFn label_keys_row = label_keys_row_impl;
