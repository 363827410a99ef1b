// One decode-attention chunk (decode_attention.h, AttnChunk), written once with the native vector of
// the including file (lanes.h: zmm in decode_attention_avx512.cpp, ymm in decode_attention_avx2.cpp,
// SSE in decode_attention.cpp). Internal linkage throughout.
//
// Per block of up to 64 tokens: scores s[g][j] = q_g . k_j for the G query rows (four keys at a time,
// one horizontal sum per four dot products), then per query row the online-softmax update
//   m' = max(m, max_j s[g][j]),  c = exp(m - m'),  p_j = exp(s[g][j] - m'),
//   l = c * l + sum_j p_j,  acc = c * acc + sum_j p_j v_j
// with a vectorised exp; the value rows are loaded once per block for all G rows.
#pragma once

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "decode_attention.h"
#include "lanes.h"
#include "sddmm.h"
#include "vec_exp.h"

namespace sf {
// attn_chunk_impl<VT> is the AttnChunkFn of the including file's ISA (see decode_attention.h).
namespace {

constexpr int64_t kAttnBlock = 64;  // tokens per softmax block (scratch is G x 64 floats)

typedef float vflu_a __attribute__((vector_size(kVL * 4), aligned(4)));  // unaligned float load / store
typedef uint16_t vu16_a __attribute__((vector_size(kVL * 2), aligned(2)));
typedef uint32_t vu32_a __attribute__((vector_size(kVL * 4)));
typedef int32_t vi32_a __attribute__((vector_size(kVL * 4)));

// kVL elements at p as float32 (bfloat16: the bits shifted into the high half, exact)
template <VT V>
inline vfl ld_a(const void* p, int64_t i) {
  if constexpr (V == VT::f32) {
    return *reinterpret_cast<const vflu_a*>(static_cast<const float*>(p) + i);
  } else {
    const uint16_t* h16 = static_cast<const uint16_t*>(p) + i;
#if defined(__AVX512F__)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h16))), 16));
#elif defined(__AVX2__)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h16))), 16));
#else
    const vu16_a h = *reinterpret_cast<const vu16_a*>(h16);
    const vu32_a w = __builtin_convertvector(h, vu32_a) << 16;
    return reinterpret_cast<vfl>(w);
#endif
  }
}

// largest lane of a (no NaN lanes: the running maxima skip NaN scores), a tree of halvings
inline float hmax_vfl(vfl a) {
#if defined(__AVX512F__)
  typedef float h8 __attribute__((vector_size(32)));
  const h8 x = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7), y = __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const h8 b = x > y ? x : y;
#elif defined(__AVX__)
  const vfl b = a;
#endif
#if defined(__AVX__)
  typedef float h4 __attribute__((vector_size(16)));
  const h4 u = __builtin_shufflevector(b, b, 0, 1, 2, 3), w = __builtin_shufflevector(b, b, 4, 5, 6, 7);
  const h4 c = u > w ? u : w;
#else
  const vfl c = a;
#endif
  const float m01 = c[0] > c[1] ? c[0] : c[1], m23 = c[2] > c[3] ? c[2] : c[3];
  return m01 > m23 ? m01 : m23;
}

// Software prefetch of the next block's key and value rows while the current block is scored: one
// step per group of four keys of the current block prefetches the rows of four tokens of the next.
// The hardware prefetchers stop at every 4 KB page (16 float32 tokens) and never follow a jump to
// the next selected span.
struct Prefetch {
  const int32_t* tok = nullptr;  // the next block's tokens
  int64_t nt = 0;
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t row = 0;  // bytes per token row
  void step(int64_t group) const {
    for (int64_t j = 4 * group; j < 4 * group + 4 && j < nt; ++j) {
      const int64_t base = tok[j] * row;
      for (int64_t o = 0; o < row; o += 64) {
        __builtin_prefetch(k + base + o, 0, 3);
        __builtin_prefetch(v + base + o, 0, 3);
      }
    }
  }
};

constexpr int64_t kMaxRegGroup = 8;  // query rows per KV head whose accumulators stay in registers

// acc[g, d:d+ND*kVL] += sum_j p[g][j] v[tok[j], d:d+ND*kVL] for GT query rows: GT x ND accumulators
// stay in registers while the block's value rows stream through (each row's ND vectors loaded once
// for the GT rows); GT x ND independent FMA chains keep the FMA units busy.
template <VT V, int GT, int ND>
void accumulate_tile(const AttnChunk& c, const float* p, const int32_t* tok, int64_t nt, int64_t d) {
  const int64_t D = c.D;
  vfl a[GT][ND];
  for (int g = 0; g < GT; ++g)
    for (int u = 0; u < ND; ++u) a[g][u] = *reinterpret_cast<const vflu_a*>(c.acc + g * D + d + u * kVL);
  for (int64_t j = 0; j < nt; ++j) {
    const int64_t base = tok[j] * D + d;
    vfl vv[ND];
    for (int u = 0; u < ND; ++u) vv[u] = ld_a<V>(c.v, base + u * kVL);
    for (int g = 0; g < GT; ++g) {
      const float pj = p[g * kAttnBlock + j];
      for (int u = 0; u < ND; ++u) a[g][u] += pj * vv[u];
    }
  }
  for (int g = 0; g < GT; ++g)
    for (int u = 0; u < ND; ++u) *reinterpret_cast<vflu_a*>(c.acc + g * D + d + u * kVL) = a[g][u];
}

constexpr int kMaxAcc = kVL >= 16 ? 16 : 8;  // accumulator vectors of a value tile (32 / 16 vector registers)

// the vector part of D (dv) in tiles of 4, 2 or 1 vectors, as many as GT rows' accumulators fit
template <VT V, int GT>
void accumulate_values(const AttnChunk& c, const float* p, const int32_t* tok, int64_t nt, int64_t dv) {
  int64_t d = 0;
  if constexpr (4 * GT <= kMaxAcc)
    for (; d + 4 * kVL <= dv; d += 4 * kVL) accumulate_tile<V, GT, 4>(c, p, tok, nt, d);
  if constexpr (2 * GT <= kMaxAcc)
    for (; d + 2 * kVL <= dv; d += 2 * kVL) accumulate_tile<V, GT, 2>(c, p, tok, nt, d);
  for (; d < dv; d += kVL) accumulate_tile<V, GT, 1>(c, p, tok, nt, d);
}

template <VT V>
void accumulate_values_reg(const AttnChunk& c, const float* p, const int32_t* tok, int64_t nt, int64_t dv) {
  switch (c.G) {
    case 1: accumulate_values<V, 1>(c, p, tok, nt, dv); break;
    case 2: accumulate_values<V, 2>(c, p, tok, nt, dv); break;
    case 3: accumulate_values<V, 3>(c, p, tok, nt, dv); break;
    case 4: accumulate_values<V, 4>(c, p, tok, nt, dv); break;
    case 5: accumulate_values<V, 5>(c, p, tok, nt, dv); break;
    case 6: accumulate_values<V, 6>(c, p, tok, nt, dv); break;
    case 7: accumulate_values<V, 7>(c, p, tok, nt, dv); break;
    default: accumulate_values<V, 8>(c, p, tok, nt, dv); break;
  }
}

// s[g][j] = q_g . k_{tok[j]} over the vector part of D (dv) for the GS query rows g0.. (GS <= 4):
// four keys at a time, each key vector loaded once for the GS rows (4 x GS accumulators), then one
// shared horizontal sum per row and four keys.
template <VT V, int GS>
void block_scores(const AttnChunk& c, int64_t g0, float* s, const int32_t* tok, int64_t nt, int64_t dv, const Prefetch& pf) {
  const int64_t D = c.D;
  const float* q = c.q + g0 * D;
  int64_t j = 0;
  for (; j + 4 <= nt; j += 4) {
    pf.step(j / 4);
    vfl a[GS][4];
    for (int g = 0; g < GS; ++g)
      for (int i = 0; i < 4; ++i) a[g][i] = vfl{};
    const int64_t r0 = tok[j] * D, r1 = tok[j + 1] * D, r2 = tok[j + 2] * D, r3 = tok[j + 3] * D;
    for (int64_t d = 0; d < dv; d += kVL) {
      const vfl k0 = ld_a<V>(c.k, r0 + d), k1 = ld_a<V>(c.k, r1 + d), k2 = ld_a<V>(c.k, r2 + d),
                k3 = ld_a<V>(c.k, r3 + d);
      for (int g = 0; g < GS; ++g) {
        const vfl qv = *reinterpret_cast<const vflu_a*>(q + g * D + d);
        a[g][0] += qv * k0;
        a[g][1] += qv * k1;
        a[g][2] += qv * k2;
        a[g][3] += qv * k3;
      }
    }
    for (int g = 0; g < GS; ++g) hsum4(a[g][0], a[g][1], a[g][2], a[g][3], s + (g0 + g) * kAttnBlock + j);
  }
  for (; j < nt; ++j) {
    vfl a[GS];
    for (int g = 0; g < GS; ++g) a[g] = vfl{};
    const int64_t r0 = tok[j] * D;
    for (int64_t d = 0; d < dv; d += kVL) {
      const vfl kv = ld_a<V>(c.k, r0 + d);
      for (int g = 0; g < GS; ++g) a[g] += *reinterpret_cast<const vflu_a*>(q + g * D + d) * kv;
    }
    for (int g = 0; g < GS; ++g) s[(g0 + g) * kAttnBlock + j] = hsum_vfl(a[g]);
  }
}

#if defined(__AVX512F__)
// Scores of the four query rows g0..g0+3 for D = 64 without a horizontal sum per dot product: lane
// 4 r + e of qi[i] holds a channel of q[g0 + r] (interleave_q4), and the matching key channels are
// broadcast to the four rows' lanes, so acc_t = sum_i qi[i] * bcast(k_t[...]) holds four partial sums
// of each row's score with key t; two rounds of lane-pair sums over four keys leave one vector of
// (row, key) scores. Per key: 16 FMAs, 16 (float32) or 8 (bfloat16) broadcast loads, ~1 shuffle
// (hsum4: ~3 per dot product).

constexpr int64_t kBcastDim = 64;  // head dimension of block_scores_q4

// The four query rows interleaved per group of key channels (lane 4 r + e: row r):
//   float32:  qi[i] = q[r][4 i + e]                 (i < 16; keys broadcast 4 channels at a time)
//   bfloat16: qi[i] = q[r][8 i + 2 e], qi[8 + i] = q[r][8 i + 2 e + 1]   (i < 8; keys broadcast 8
//             channels at a time, as bfloat16 pairs: a pair's low half shifted up is the even channel,
//             its high half masked the odd one, both exact)
template <VT V>
inline void interleave_q4(const float* q, __m512* qi) {
  constexpr int64_t D = kBcastDim;
  if constexpr (V == VT::f32) {
    for (int i = 0; i < 16; ++i) {
      const __m512 lo = _mm512_insertf32x4(_mm512_castps128_ps512(_mm_loadu_ps(q + 4 * i)), _mm_loadu_ps(q + D + 4 * i), 1);
      const __m512 hi = _mm512_insertf32x4(_mm512_castps128_ps512(_mm_loadu_ps(q + 2 * D + 4 * i)), _mm_loadu_ps(q + 3 * D + 4 * i), 1);
      qi[i] = _mm512_shuffle_f32x4(lo, hi, 0x44);  // [lo.0, lo.1, hi.0, hi.1]
    }
  } else {
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int i = 0; i < 8; ++i) {
      const __m512 x = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(q + 8 * i)), _mm256_loadu_ps(q + D + 8 * i), 1);
      const __m512 y = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(q + 2 * D + 8 * i)), _mm256_loadu_ps(q + 3 * D + 8 * i), 1);
      qi[i] = _mm512_permutex2var_ps(x, ev, y);
      qi[8 + i] = _mm512_permutex2var_ps(x, od, y);
    }
  }
}

// a, e += the four rows' partial products with key kt (two FMA chains), lanes as interleave_q4
template <VT V>
inline void dot_q4(const __m512* qi, const void* kt, __m512& a, __m512& e) {
  if constexpr (V == VT::f32) {
    const float* k = static_cast<const float*>(kt);
#pragma GCC unroll 8
    for (int i = 0; i < 16; i += 2) {
      a = _mm512_fmadd_ps(qi[i], _mm512_broadcast_f32x4(_mm_loadu_ps(k + 4 * i)), a);
      e = _mm512_fmadd_ps(qi[i + 1], _mm512_broadcast_f32x4(_mm_loadu_ps(k + 4 * i + 4)), e);
    }
  } else {
    const uint16_t* k = static_cast<const uint16_t*>(kt);
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512i kb = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + 8 * i)));
      a = _mm512_fmadd_ps(qi[i], _mm512_castsi512_ps(_mm512_slli_epi32(kb, 16)), a);
      e = _mm512_fmadd_ps(qi[8 + i], _mm512_castsi512_ps(_mm512_and_si512(kb, hi)), e);
    }
  }
}

// s[r * 64 + t] = sum of the four lanes 4 r..4 r + 3 of a_t (row r's partial sums with key t), r, t < 4:
// two rounds of lane-pair sums (vpermt2ps), the result's lane 4 r + t stored as four rows of 4 scores
inline void store_scores4(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* s) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  // b01 lanes 0..7: key 0, row r's pair sums at 2 r, 2 r + 1; lanes 8..15: key 1 (b23: keys 2, 3)
  const __m512 b01 = _mm512_add_ps(_mm512_permutex2var_ps(a0, even, a1), _mm512_permutex2var_ps(a0, odd, a1));
  const __m512 b23 = _mm512_add_ps(_mm512_permutex2var_ps(a2, even, a3), _mm512_permutex2var_ps(a2, odd, a3));
  const __m512i rk0 = _mm512_setr_epi32(0, 8, 16, 24, 2, 10, 18, 26, 4, 12, 20, 28, 6, 14, 22, 30);
  const __m512i rk1 = _mm512_setr_epi32(1, 9, 17, 25, 3, 11, 19, 27, 5, 13, 21, 29, 7, 15, 23, 31);
  const __m512 o = _mm512_add_ps(_mm512_permutex2var_ps(b01, rk0, b23), _mm512_permutex2var_ps(b01, rk1, b23));
  _mm_storeu_ps(s, _mm512_castps512_ps128(o));
  _mm_storeu_ps(s + kAttnBlock, _mm512_extractf32x4_ps(o, 1));
  _mm_storeu_ps(s + 2 * kAttnBlock, _mm512_extractf32x4_ps(o, 2));
  _mm_storeu_ps(s + 3 * kAttnBlock, _mm512_extractf32x4_ps(o, 3));
}

// s[g0 + r][j] for r < 4, j < nt (the key rows tok[j])
template <VT V>
void block_scores_q4(const AttnChunk& c, int64_t g0, float* s, const int32_t* tok, int64_t nt, const Prefetch& pf) {
  constexpr int64_t D = kBcastDim;
  const float* q = c.q + g0 * D;
  __m512 qi[16];
  interleave_q4<V>(q, qi);
  int64_t j = 0;
  for (; j + 4 <= nt; j += 4) {
    pf.step(j / 4);
    constexpr int64_t row = D * (V == VT::f32 ? 4 : 2);
    const char* k = static_cast<const char*>(c.k);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, e0 = a0, e1 = a0, e2 = a0, e3 = a0;
    dot_q4<V>(qi, k + tok[j] * row, a0, e0);
    dot_q4<V>(qi, k + tok[j + 1] * row, a1, e1);
    dot_q4<V>(qi, k + tok[j + 2] * row, a2, e2);
    dot_q4<V>(qi, k + tok[j + 3] * row, a3, e3);
    a0 = _mm512_add_ps(a0, e0);
    a1 = _mm512_add_ps(a1, e1);
    a2 = _mm512_add_ps(a2, e2);
    a3 = _mm512_add_ps(a3, e3);
    store_scores4(a0, a1, a2, a3, s + g0 * kAttnBlock + j);
  }
  for (; j < nt; ++j) {
    const void* kj = static_cast<const char*>(c.k) + tok[j] * D * (V == VT::f32 ? 4 : 2);
    __m512 a = _mm512_setzero_ps(), e = a;
    dot_q4<V>(qi, kj, a, e);
    a = _mm512_add_ps(a, e);
    alignas(64) float l[16];
    _mm512_store_ps(l, a);
    for (int r = 0; r < 4; ++r) s[(g0 + r) * kAttnBlock + j] = (l[4 * r] + l[4 * r + 1]) + (l[4 * r + 2] + l[4 * r + 3]);
  }
}
#endif

inline void init_partial(const AttnChunk& c) {
  for (int64_t g = 0; g < c.G; ++g) {
    c.m[g] = -std::numeric_limits<float>::infinity();
    c.l[g] = 0.f;
    for (int64_t d = 0; d < c.D; ++d) c.acc[g * c.D + d] = 0.f;
  }
}

// The online-softmax update of c's G rows with the block's scores c.scratch (G, 64), nt of them per row
// (padded to whole vectors with -inf): running max and sum, accumulators rescaled; the scores become
// the probabilities p = exp(score - new max).
inline void softmax_update(const AttnChunk& c, int64_t nt) {
  const int64_t G = c.G, D = c.D;
  const float ninf = -std::numeric_limits<float>::infinity();
  float* s = c.scratch;
  const int64_t ntv = (nt + kVL - 1) / kVL * kVL;
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * kAttnBlock;
    for (int64_t jj = nt; jj < ntv; ++jj) sg[jj] = ninf;  // whole vectors: exp(-inf) = 0
    vfl vm = vfl{} + ninf;  // lane-wise running max (the -inf padding does not change it)
    for (int64_t j = 0; j < ntv; j += kVL) {
      const vfl x = *reinterpret_cast<const vflu_a*>(sg + j);
      vm = x > vm ? x : vm;
    }
    const float bm = hmax_vfl(vm);
    const float m_old = c.m[g];
    const float m_new = m_old > bm ? m_old : bm;
    // the factor of the earlier partial sums: 0 before the first block, exactly 1 while the max holds
    const float corr = m_old == ninf ? 0.f : m_old == m_new ? 1.f : exp_neg1(m_old - m_new);
    const vfl mv = vfl{} + m_new;
    vfl lsum = vfl{};
    for (int64_t j = 0; j < ntv; j += kVL) {
      const vfl p = exp_neg(*reinterpret_cast<const vflu_a*>(sg + j) - mv);
      *reinterpret_cast<vflu_a*>(sg + j) = p;
      lsum += p;
    }
    c.l[g] = c.l[g] * corr + hsum_vfl(lsum);
    c.m[g] = m_new;
    if (corr != 1.f) {
      float* ag = c.acc + g * D;
      const int64_t dv = D - D % kVL;
      for (int64_t d = 0; d < dv; d += kVL) *reinterpret_cast<vflu_a*>(ag + d) = *reinterpret_cast<const vflu_a*>(ag + d) * corr;
      for (int64_t d = dv; d < D; ++d) ag[d] *= corr;
    }
  }
}

// The online-softmax update of c's partial results with the nt <= 64 tokens tok[0..nt) of c.k / c.v.
template <VT V>
void attn_block(const AttnChunk& c, const int32_t* tok, int64_t nt, const Prefetch& pf = Prefetch{}) {
  const int64_t G = c.G, D = c.D, dv = D - D % kVL;  // dv: dimensions done by vectors
  float* s = c.scratch;  // (G, 64)
  // scores s[g][j] = q_g . k_{tok[j]}, query rows in groups of up to 4
#if defined(__AVX512F__)
  if (D == kBcastDim && G % 4 == 0) {
    for (int64_t g0 = 0; g0 < G; g0 += 4) block_scores_q4<V>(c, g0, s, tok, nt, g0 == 0 ? pf : Prefetch{});
  } else
#endif
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const Prefetch& p = g0 == 0 ? pf : Prefetch{};  // the first group of rows walks the block once
    switch (min64(4, G - g0)) {
      case 1: block_scores<V, 1>(c, g0, s, tok, nt, dv, p); break;
      case 2: block_scores<V, 2>(c, g0, s, tok, nt, dv, p); break;
      case 3: block_scores<V, 3>(c, g0, s, tok, nt, dv, p); break;
      default: block_scores<V, 4>(c, g0, s, tok, nt, dv, p); break;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * kAttnBlock;
    for (int64_t j = 0; j < nt; ++j) {
      for (int64_t d = dv; d < c.D; ++d) sg[j] += c.q[g * c.D + d] * load_val<V>(c.k, tok[j] * c.D + d);
    }
  }
  softmax_update(c, nt);
  // acc_g += p_gj * v_j, each value row loaded once for the G rows
  if (G <= kMaxRegGroup) {
    accumulate_values_reg<V>(c, s, tok, nt, dv);
  } else {
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t r0 = tok[j] * D;
      for (int64_t d = 0; d < dv; d += kVL) {
        const vfl vv = ld_a<V>(c.v, r0 + d);
        for (int64_t g = 0; g < G; ++g) {
          vflu_a* ap = reinterpret_cast<vflu_a*>(c.acc + g * D + d);
          *ap = *ap + s[g * kAttnBlock + j] * vv;
        }
      }
    }
  }
  for (int64_t j = 0; j < nt; ++j) {
    const int64_t r0 = tok[j] * D;
    for (int64_t d = dv; d < D; ++d) {
      const float vv = load_val<V>(c.v, r0 + d);
      for (int64_t g = 0; g < G; ++g) c.acc[g * D + d] += s[g * kAttnBlock + j] * vv;
    }
  }
}

// The tokens of a chunk's pieces in order, cut into blocks of up to 64 (a block may join pieces:
// Quest's 16-token pages are attended four at a time).
struct BlockWalk {
  const int32_t* pieces;
  int64_t np, pc = 0, off = 0;  // next token: pieces[pc] start + off
  int64_t fill(int32_t* tok) {
    int64_t n = 0;
    while (n < kAttnBlock && pc < np) {
      const int64_t start = pieces[2 * pc], len = pieces[2 * pc + 1], take = min64(kAttnBlock - n, len - off);
      for (int64_t i = 0; i < take; ++i) tok[n++] = static_cast<int32_t>(start + off + i);
      off += take;
      if (off == len) {
        ++pc;
        off = 0;
      }
    }
    return n;
  }
};

template <VT V>
void attn_chunk_impl(const AttnChunk& c) {
  init_partial(c);
  int32_t buf[2][kAttnBlock];
  BlockWalk walk{c.pieces, c.np};
  int32_t *cur = buf[0], *next = buf[1];
  int64_t nt = walk.fill(cur);
  while (nt > 0) {
    const int64_t nn = walk.fill(next);  // the next block, prefetched during this one
    Prefetch pf;
    pf.tok = next;
    pf.nt = nn;
    pf.k = static_cast<const char*>(c.k);
    pf.v = static_cast<const char*>(c.v);
    pf.row = c.D * (V == VT::f32 ? 4 : 2);
    attn_block<V>(c, cur, nt, pf);
    std::swap(cur, next);
    nt = nn;
  }
}

// Compressed tokens [t0, t1) (decode_attention.h, SparseKvChunk), in blocks of 64 tokens: on AVX-512
// with D = 16 R <= 128 computed from the kept values expanded into registers (sparse_block_direct);
// otherwise each block is expanded into dense float32 rows (zeros where a channel was pruned) that go
// through attn_block.
// Whether every token of [t0, t0 + nt) marks exactly keep channels below D in both bitmaps; if not,
// *c.bad names the first that does not.
// WC: the words per token when known at compile time (0: c.words).
template <int WC = 0>
inline bool bitmaps_ok(const SparseKvChunk& c, int64_t t0, int64_t nt) {
  const int64_t D = c.base.D, W = WC > 0 ? WC : c.words, keep = c.keep;
  const int64_t tail = D - 64 * (W - 1);  // valid channels of the last word
  const uint64_t beyond = tail < 64 ? ~((uint64_t{1} << tail) - 1) : 0;
  int64_t off = 0;  // any count other than keep, or a bit past D - 1
  int64_t j0 = t0;
#if defined(__AVX512BW__)
  if constexpr (WC == 1) {  // eight tokens per step: byte popcounts from a nibble table, summed per word
    const __m512i lut = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100), low = _mm512_set1_epi8(0x0f);
    const __m512i want = _mm512_set1_epi64(keep), past = _mm512_set1_epi64(static_cast<int64_t>(beyond));
    auto count = [&](__m512i w) {
      const __m512i n = _mm512_add_epi8(_mm512_shuffle_epi8(lut, _mm512_and_si512(w, low)),
                                        _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(w, 4), low)));
      return _mm512_sad_epu8(n, _mm512_setzero_si512());
    };
    __mmask8 wrong = 0;
    for (; j0 + 8 <= t0 + nt; j0 += 8) {
      const __m512i kw = _mm512_loadu_si512(c.kbits + j0), vw = _mm512_loadu_si512(c.vbits + j0);
      wrong |= _mm512_cmpneq_epi64_mask(count(kw), want) | _mm512_cmpneq_epi64_mask(count(vw), want) |
               _mm512_test_epi64_mask(_mm512_or_si512(kw, vw), past);
    }
    off = wrong;
  }
#endif
  for (int64_t j = j0; j < t0 + nt; ++j) {
    int64_t ck = 0, cv = 0;
    for (int64_t w = 0; w < W; ++w) {
      ck += __builtin_popcountll(c.kbits[j * W + w]);
      cv += __builtin_popcountll(c.vbits[j * W + w]);
    }
    off |= (ck ^ keep) | (cv ^ keep) | static_cast<int64_t>((c.kbits[j * W + W - 1] | c.vbits[j * W + W - 1]) & beyond);
  }
  if (off == 0) return true;
  for (int64_t j = t0; j < t0 + nt; ++j) {
    for (int which = 0; which < 2; ++which) {
      const uint64_t* tb = (which ? c.vbits : c.kbits) + j * W;
      int64_t count = 0;
      for (int64_t w = 0; w < W; ++w) count += __builtin_popcountll(tb[w]);
      if (count != keep || (tb[W - 1] & beyond) != 0) {
        *c.bad = 2 * j + which;
        return false;
      }
    }
  }
  return true;  // not reached
}

#if defined(__AVX512F__)
// The 16 channels of segment sg (channels 16 sg ..) of a compressed row as a vector: its kept values
// from vals[i ..] (i advanced past them) placed at the set bits of the row's bitmap words.
template <VT V>
inline __m512 expand_segment(const void* vals, int64_t& i, const uint64_t* bits, int sg) {
  const __mmask16 m = static_cast<__mmask16>(bits[sg / 4] >> (16 * (sg % 4)));
  __m512 x;
  if constexpr (V == VT::f32) {
    x = _mm512_maskz_expandloadu_ps(m, static_cast<const float*>(vals) + i);
  } else {
    const __mmask16 first = static_cast<__mmask16>((1u << __builtin_popcount(m)) - 1);
    const __m256i h = _mm256_maskz_loadu_epi16(first, static_cast<const uint16_t*>(vals) + i);
    x = _mm512_maskz_expand_ps(m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  i += __builtin_popcount(m);
  return x;
}

// row[0:D] = the token's kept values vals[i..] placed at the set bits of its bitmap words (zeros
// elsewhere), 16 channels per step (D a multiple of 16; no load passes the kept values).
template <VT V>
inline void expand_row(const void* vals, int64_t i, const uint64_t* bits, int64_t D, float* row) {
  for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(row + c, expand_segment<V>(vals, i, bits, static_cast<int>(c / 16)));
}

// Register order of the direct path: a compressed row becomes R = D / 16 vectors of 16 float32 lanes.
//   Natural order: vector r holds channels 16 r .. 16 r + 15 (vexpandps; bfloat16 widened first).
//   Word order (bfloat16 on a build with AVX512_VBMI2, D % 32 == 0): one vpexpandw places 32 kept
//   bfloat16 channels at once; vector 2 p holds the even channels 32 p + 2 i (the bits shifted into the
//   high half), vector 2 p + 1 the odd ones (the high half masked in place), both exact. The query
//   rows and the value accumulators of the chunk are kept in the same order (to_word_order).
#if defined(__AVX512VBMI2__)
constexpr bool kHaveWordExpand = true;
#else
constexpr bool kHaveWordExpand = false;
#endif

// x[0:R] = one token's row from its kept values vals and bitmap words bits (R = D / 16; WO: word order)
template <VT V, int R, bool WO>
inline void expand_regs(const void* vals, const uint64_t* bits, __m512* x) {
#if defined(__AVX512VBMI2__)
  if constexpr (WO) {
    const uint16_t* v = static_cast<const uint16_t*>(vals);
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int p = 0; p < R / 2; ++p) {
      const uint32_t m = static_cast<uint32_t>(bits[p / 2] >> (32 * (p % 2)));
      const __m512i w = _mm512_maskz_expandloadu_epi16(_cvtu32_mask32(m), v);
      v += __builtin_popcount(m);
      x[2 * p] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      x[2 * p + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
    }
    return;
  }
#endif
  if constexpr (!WO) {
    int64_t i = 0;
    for (int r = 0; r < R; ++r) x[r] = expand_segment<V>(vals, i, bits, r);
  }
}

// natural <-> word order of the rows of a (rows, D) float32 matrix in place (D % 32 == 0)
inline void to_word_order(float* m, int64_t rows, int64_t D, bool back) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < D; c += 32) {
      float* p = m + r * D + c;
      const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
      _mm512_storeu_ps(p, _mm512_permutex2var_ps(a, back ? lo : ev, b));
      _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(a, back ? hi : od, b));
    }
  }
}

// Lane o of the result = the sum of the 16 lanes of v[4 (o % 4) + o / 4]: a tree of 30 shuffles and
// 15 adds for 16 dot products (~2 shuffles each; four hsum4 take ~3).
inline vfl reduce16(const vfl* v) {
  vfl w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k)  // lanes 0..7: 8 partial sums of v[2k]; 8..15: of v[2k + 1]
    w[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * k], v[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int m = 0; m < 4; ++m)  // 128-bit lane L: 4 partial sums of v[4m + L]
    x[m] = __builtin_shufflevector(w[2 * m], w[2 * m + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * m], w[2 * m + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int n = 0; n < 2; ++n)  // 128-bit lane L: [2 partials of v[8n + L], 2 of v[8n + 4 + L]]
    y[n] = __builtin_shufflevector(x[2 * n], x[2 * n + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(x[2 * n], x[2 * n + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  // 128-bit lane L: [v[L], v[4 + L], v[8 + L], v[12 + L]]
  return __builtin_shufflevector(y[0], y[1], 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30) +
         __builtin_shufflevector(y[0], y[1], 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, 13, 15, 29, 31);
}

// Software prefetch of a byte range, a few 64-byte lines per step (spread over a block: a burst of a
// whole block's prefetches fills the line-fill buffers and stalls the loads behind them).
struct LinePrefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  void step(int lines) {
    for (int i = 0; i < lines && p < end; ++i, p += 64) __builtin_prefetch(p, 0, 3);
  }
};

// acc[g0 + g] += sum_j p[g0 + g][j] v_{t0 + j} (j < nt) for the GT query rows g0.. of the direct path:
// GT x R accumulators stay in registers while each value row is expanded once (pf: prefetches the
// next block's values, `lines` per four tokens).
template <VT V, int R, bool WO, int GT>
void sparse_values(const SparseKvChunk& c, const AttnChunk& a, int64_t g0, int64_t t0, int64_t nt, LinePrefetch* pf, int lines) {
  constexpr int64_t D = 16 * R, W = (D + 63) / 64;
  constexpr int64_t elt = V == VT::f32 ? 4 : 2;
  const int64_t row = c.keep * elt;
  const char* vv = static_cast<const char*>(c.vvals);
  const float* sc = a.scratch + g0 * kAttnBlock;
  __m512 acc[GT][R];
  for (int g = 0; g < GT; ++g)
    for (int k = 0; k < R; ++k) acc[g][k] = _mm512_loadu_ps(a.acc + (g0 + g) * D + 16 * k);
  for (int64_t j = 0; j < nt; ++j) {
    if (pf && j % 4 == 0) pf->step(lines);
    const int64_t tok = t0 + j;
    __m512 vx[R];
    expand_regs<V, R, WO>(vv + tok * row, c.vbits + tok * W, vx);
    for (int g = 0; g < GT; ++g) {
      const __m512 p = _mm512_set1_ps(sc[g * kAttnBlock + j]);
      for (int k = 0; k < R; ++k) acc[g][k] = _mm512_fmadd_ps(p, vx[k], acc[g][k]);
    }
  }
  for (int g = 0; g < GT; ++g)
    for (int k = 0; k < R; ++k) _mm512_storeu_ps(a.acc + (g0 + g) * D + 16 * k, acc[g][k]);
}

// One block of compressed tokens [t0, t0 + nt) straight from the kept values, no dense rows written
// (D = 16 R, R <= 8; q: the chunk's scaled query rows (G, D) in register order):
//   scores: TB tokens at a time (4, or 2 for R > 4), their keys expanded into registers once for all
//     G query rows; the TB x (16 / TB) dot products of a step summed by one reduce16;
//   the online-softmax update (softmax_update);
//   values: per tile of GT query rows (GT x R accumulators in registers), each value row expanded
//     once and added with the rows' probabilities.
// The next block's kept values and bitmap words are prefetched while this block is computed.
template <VT V, int R, bool WO>
void sparse_block_direct(const SparseKvChunk& c, const AttnChunk& a, const float* q, int64_t t0, int64_t nt) {
  constexpr int64_t D = 16 * R, W = (D + 63) / 64;
  constexpr int TB = R <= 4 ? 4 : 2;  // tokens per score step
  constexpr int GR = 16 / TB;         // query rows per score step
  constexpr int GT = R <= 4 ? 4 : 2;  // query rows per value tile
  constexpr int64_t elt = V == VT::f32 ? 4 : 2;
  const int64_t G = a.G, keep = c.keep, row = keep * elt;
  const char* kv = static_cast<const char*>(c.kvals);
  const char* vv = static_cast<const char*>(c.vvals);
  float* sc = a.scratch;  // (G, 64)
  const int64_t t1 = min64(c.t1, t0 + nt + kAttnBlock);  // the next block's end
  LinePrefetch pk{kv + (t0 + nt) * row, kv + t1 * row}, pv{vv + (t0 + nt) * row, vv + t1 * row};
  LinePrefetch pb{reinterpret_cast<const char*>(c.kbits + (t0 + nt) * W), reinterpret_cast<const char*>(c.kbits + t1 * W)};
  LinePrefetch pvb{reinterpret_cast<const char*>(c.vbits + (t0 + nt) * W), reinterpret_cast<const char*>(c.vbits + t1 * W)};
  const int lines = static_cast<int>((kAttnBlock * row / 64 + 15) / 16) + 1;  // per four tokens
  for (int64_t j = 0; j < nt; j += TB) {
    pk.step(lines);
    if (j % 16 == 0) {
      pb.step(2 * static_cast<int>(W));
      pvb.step(2 * static_cast<int>(W));
    }
    const int tb = static_cast<int>(min64(TB, nt - j));
    __m512 kx[TB][R];
    for (int t = 0; t < TB; ++t) {
      const int64_t tok = t0 + j + (t < tb ? t : 0);
      expand_regs<V, R, WO>(kv + tok * row, c.kbits + tok * W, kx[t]);
    }
    for (int64_t g0 = 0; g0 < G; g0 += GR) {
      vfl acc[16];
      for (int o = 0; o < 16; ++o) {  // dot product o = (row r, token t), placed where reduce16 puts it at lane o
        const int r = o / TB, t = o % TB;
        const float* qg = q + min64(g0 + r, G - 1) * D;
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(qg), kx[t][0]);
        for (int k = 1; k < R; ++k) s = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * k), kx[t][k], s);
        acc[4 * (o % 4) + o / 4] = reinterpret_cast<vfl>(s);
      }
      alignas(64) float dots[16];
      *reinterpret_cast<vfl*>(dots) = reduce16(acc);
      if (tb == TB && g0 + GR <= G) {
        for (int r = 0; r < GR; ++r) std::memcpy(sc + (g0 + r) * kAttnBlock + j, dots + r * TB, TB * sizeof(float));
      } else {
        for (int r = 0; r < GR && g0 + r < G; ++r)
          for (int t = 0; t < tb; ++t) sc[(g0 + r) * kAttnBlock + j + t] = dots[r * TB + t];
      }
    }
  }
  softmax_update(a, nt);
  int64_t g0 = 0;
  for (; g0 + GT <= G; g0 += GT) sparse_values<V, R, WO, GT>(c, a, g0, t0, nt, g0 == 0 ? &pv : nullptr, lines);
  switch (G - g0) {  // the last rows (fewer than GT)
    case 1: sparse_values<V, R, WO, 1>(c, a, g0, t0, nt, g0 == 0 ? &pv : nullptr, lines); break;
    case 2: if constexpr (GT > 2) sparse_values<V, R, WO, 2>(c, a, g0, t0, nt, g0 == 0 ? &pv : nullptr, lines); break;
    case 3: if constexpr (GT > 3) sparse_values<V, R, WO, 3>(c, a, g0, t0, nt, g0 == 0 ? &pv : nullptr, lines); break;
    default: break;
  }
}

// The direct path over a chunk's blocks for D = 16 R (each block's bitmaps checked first); false
// (nothing done) for other head dimensions.
template <VT V>
bool sparse_chunk_direct(const SparseKvChunk& c, const AttnChunk& a) {
  auto run = [&](auto rc) {
    constexpr int R = decltype(rc)::value;
    constexpr bool WO = V == VT::bf16 && kHaveWordExpand && R % 2 == 0;
    const float* q = a.q;
    if constexpr (WO) {  // the query rows in word order; the accumulators turned back at the end
      for (int64_t i = 0; i < a.G * a.D; ++i) c.qbuf[i] = a.q[i];
      to_word_order(c.qbuf, a.G, a.D, false);
      q = c.qbuf;
    }
    for (int64_t t0 = c.t0; t0 < c.t1; t0 += kAttnBlock) {
      const int64_t nt = min64(kAttnBlock, c.t1 - t0);
      if (!bitmaps_ok<(R + 3) / 4>(c, t0, nt)) return;
      sparse_block_direct<V, R, WO>(c, a, q, t0, nt);
    }
    if constexpr (WO) to_word_order(a.acc, a.G, a.D, true);
  };
  switch (a.D) {
    case 16: run(std::integral_constant<int, 1>{}); return true;
    case 32: run(std::integral_constant<int, 2>{}); return true;
    case 48: run(std::integral_constant<int, 3>{}); return true;
    case 64: run(std::integral_constant<int, 4>{}); return true;
    case 80: run(std::integral_constant<int, 5>{}); return true;
    case 96: run(std::integral_constant<int, 6>{}); return true;
    case 112: run(std::integral_constant<int, 7>{}); return true;
    case 128: run(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}
#endif

// tokens 0..63 (a block of consecutive rows)
constexpr struct Iota {
  int32_t v[kAttnBlock];
  constexpr Iota() : v() {
    for (int i = 0; i < kAttnBlock; ++i) v[i] = i;
  }
} kIotaTable{};
constexpr const int32_t* kIota = kIotaTable.v;

template <VT V>
void sparse_chunk_impl(const SparseKvChunk& c) {
  const int64_t D = c.base.D, W = c.words, keep = c.keep;
  AttnChunk dense = c.base;
  dense.k = c.kbuf;
  dense.v = c.vbuf;
  init_partial(dense);
#if defined(__AVX512F__)
  if (sparse_chunk_direct<V>(c, dense)) return;
#endif
  for (int64_t t0 = c.t0; t0 < c.t1; t0 += kAttnBlock) {
    const int64_t nt = min64(kAttnBlock, c.t1 - t0);
    if (!bitmaps_ok(c, t0, nt)) return;
    for (int which = 0; which < 2; ++which) {
      const void* vals = which ? c.vvals : c.kvals;
      const uint64_t* bits = which ? c.vbits : c.kbits;
      float* out = which ? c.vbuf : c.kbuf;
      const int64_t elt = V == VT::f32 ? 4 : 2, next = t0 + kAttnBlock;  // the next block, prefetched meanwhile
      for (int64_t j = 0; j < nt; ++j) {
        float* row = out + j * D;
        const int64_t i = (t0 + j) * keep;
        const uint64_t* tb = bits + (t0 + j) * W;
        if (next + j < c.t1) {
          const char* nv = static_cast<const char*>(vals) + (next + j) * keep * elt;
          __builtin_prefetch(nv, 0, 3);
          __builtin_prefetch(nv + keep * elt - 1, 0, 3);
          if (j % 8 == 0) __builtin_prefetch(bits + (next + j) * W, 0, 3);
        }
#if defined(__AVX512F__)
        if (D % 16 == 0) {
          expand_row<V>(vals, i, tb, D, row);
          continue;
        }
#endif
        for (int64_t d = 0; d < D; ++d) row[d] = 0.f;
        int64_t e = i;
        for (int64_t w = 0; w < W; ++w) {
          for (uint64_t b = tb[w]; b; b &= b - 1) row[w * 64 + __builtin_ctzll(b)] = load_val<V>(vals, e++);
        }
      }
    }
    attn_block<VT::f32>(dense, kIota, nt);
  }
}

template <VT V>
void page_score_impl(const float* qpos, const float* qneg, const void* kmin, const void* kmax, int64_t pages, int64_t D,
                     float* score) {
  const int64_t dv = D - D % kVL;
  for (int64_t pg = 0; pg < pages; ++pg) {
    vfl a = vfl{}, b = vfl{};
    const int64_t r0 = pg * D;
    for (int64_t d = 0; d < dv; d += kVL) {
      a += *reinterpret_cast<const vflu_a*>(qpos + d) * ld_a<V>(kmax, r0 + d);
      b += *reinterpret_cast<const vflu_a*>(qneg + d) * ld_a<V>(kmin, r0 + d);
    }
    float sc = hsum_vfl(a + b);
    for (int64_t d = dv; d < D; ++d) sc += qpos[d] * load_val<V>(kmax, r0 + d) + qneg[d] * load_val<V>(kmin, r0 + d);
    score[pg] = sc;
  }
}

}  // namespace
}  // namespace sf

// The kernel table of decode_attention.h for the including file's ISA: `namespace <isa> { SF_DEFINE_DECODE_ATTENTION_KERNELS }`.
#define SF_DEFINE_DECODE_ATTENTION_KERNELS                                       \
  extern const AttnChunkFn attn_chunk_f32 = attn_chunk_impl<VT::f32>;           \
  extern const AttnChunkFn attn_chunk_bf16 = attn_chunk_impl<VT::bf16>;         \
  extern const PageScoreFn page_score_f32 = page_score_impl<VT::f32>;           \
  extern const PageScoreFn page_score_bf16 = page_score_impl<VT::bf16>;         \
  extern const SparseChunkFn sparse_chunk_f32 = sparse_chunk_impl<VT::f32>;     \
  extern const SparseChunkFn sparse_chunk_bf16 = sparse_chunk_impl<VT::bf16>;
