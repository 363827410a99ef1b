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
#include <limits>

#include "decode_attention.h"
#include "lanes.h"
#include "sddmm.h"

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
    const vu16_a h = *reinterpret_cast<const vu16_a*>(static_cast<const uint16_t*>(p) + i);
    const vu32_a w = __builtin_convertvector(h, vu32_a) << 16;
    return reinterpret_cast<vfl>(w);
  }
}

// exp(x) for x <= 0 (the softmax only needs that range): x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for e^r, times 2^n built in the exponent bits; 0 below -87.3 (and for -inf), NaN stays NaN.
inline vfl exp_neg(vfl x) {
  const vfl lo = vfl{} - 87.3f;
  const auto under = x < lo;  // -inf included
  x = under ? lo : x;
  const vfl magic = vfl{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const vfl t = x * 1.44269504088896341f + magic;
  const vfl nf = t - magic;
  const vfl r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  vfl poly = vfl{} + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.f;
  const vi32_a ni = __builtin_convertvector(nf, vi32_a);
  const vfl scale = reinterpret_cast<vfl>((ni + 127) << 23);
  const vfl y = poly * scale;
  return under ? vfl{} : y;
}

inline float exp_neg1(float x) {
  vfl v = vfl{} + x;
  return exp_neg(v)[0];
}

constexpr int64_t kMaxRegGroup = 8;  // query rows per KV head whose accumulators stay in registers

// acc[g, d:d+kVL] += sum_j p[g][j] v[t0 + j, d:d+kVL] for GT query rows: the GT accumulators of one
// vector of dimensions stay in registers while the block's value rows stream through.
template <VT V, int GT>
void accumulate_values(const AttnChunk& c, const float* p, int64_t t0, int64_t nt, int64_t dv) {
  const int64_t D = c.D;
  for (int64_t d = 0; d < dv; d += kVL) {
    vfl a[GT];
    for (int g = 0; g < GT; ++g) a[g] = *reinterpret_cast<const vflu_a*>(c.acc + g * D + d);
    const int64_t base = t0 * D + d;
    for (int64_t j = 0; j < nt; ++j) {
      const vfl vv = ld_a<V>(c.v, base + j * D);
      for (int g = 0; g < GT; ++g) a[g] += p[g * kAttnBlock + j] * vv;
    }
    for (int g = 0; g < GT; ++g) *reinterpret_cast<vflu_a*>(c.acc + g * D + d) = a[g];
  }
}

template <VT V>
void accumulate_values_reg(const AttnChunk& c, const float* p, int64_t t0, int64_t nt, int64_t dv) {
  switch (c.G) {
    case 1: accumulate_values<V, 1>(c, p, t0, nt, dv); break;
    case 2: accumulate_values<V, 2>(c, p, t0, nt, dv); break;
    case 3: accumulate_values<V, 3>(c, p, t0, nt, dv); break;
    case 4: accumulate_values<V, 4>(c, p, t0, nt, dv); break;
    case 5: accumulate_values<V, 5>(c, p, t0, nt, dv); break;
    case 6: accumulate_values<V, 6>(c, p, t0, nt, dv); break;
    case 7: accumulate_values<V, 7>(c, p, t0, nt, dv); break;
    default: accumulate_values<V, 8>(c, p, t0, nt, dv); break;
  }
}

// s[g][j] = q_g . k_{t0 + j} over the vector part of D (dv) for the GS query rows g0.. (GS <= 4):
// four keys at a time, each key vector loaded once for the GS rows (4 x GS accumulators), then one
// shared horizontal sum per row and four keys.
template <VT V, int GS>
void block_scores(const AttnChunk& c, int64_t g0, float* s, int64_t t0, int64_t nt, int64_t dv) {
  const int64_t D = c.D;
  const float* q = c.q + g0 * D;
  int64_t j = 0;
  for (; j + 4 <= nt; j += 4) {
    vfl a[GS][4];
    for (int g = 0; g < GS; ++g)
      for (int i = 0; i < 4; ++i) a[g][i] = vfl{};
    const int64_t r0 = (t0 + j) * D;
    for (int64_t d = 0; d < dv; d += kVL) {
      const vfl k0 = ld_a<V>(c.k, r0 + d), k1 = ld_a<V>(c.k, r0 + D + d), k2 = ld_a<V>(c.k, r0 + 2 * D + d),
                k3 = ld_a<V>(c.k, r0 + 3 * D + d);
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
    const int64_t r0 = (t0 + j) * D;
    for (int64_t d = 0; d < dv; d += kVL) {
      const vfl kv = ld_a<V>(c.k, r0 + d);
      for (int g = 0; g < GS; ++g) a[g] += *reinterpret_cast<const vflu_a*>(q + g * D + d) * kv;
    }
    for (int g = 0; g < GS; ++g) s[(g0 + g) * kAttnBlock + j] = hsum_vfl(a[g]);
  }
}

inline void init_partial(const AttnChunk& c) {
  for (int64_t g = 0; g < c.G; ++g) {
    c.m[g] = -std::numeric_limits<float>::infinity();
    c.l[g] = 0.f;
    for (int64_t d = 0; d < c.D; ++d) c.acc[g * c.D + d] = 0.f;
  }
}

// The online-softmax update of c's partial results with the nt <= 64 tokens t0.. of c.k / c.v.
template <VT V>
void attn_block(const AttnChunk& c, int64_t t0, int64_t nt) {
  const int64_t G = c.G, D = c.D, dv = D - D % kVL;  // dv: dimensions done by vectors
  const float ninf = -std::numeric_limits<float>::infinity();
  float* s = c.scratch;  // (G, 64)
  // scores s[g][j] = q_g . k_{t0 + j}, query rows in groups of up to 4
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    switch (min64(4, G - g0)) {
      case 1: block_scores<V, 1>(c, g0, s, t0, nt, dv); break;
      case 2: block_scores<V, 2>(c, g0, s, t0, nt, dv); break;
      case 3: block_scores<V, 3>(c, g0, s, t0, nt, dv); break;
      default: block_scores<V, 4>(c, g0, s, t0, nt, dv); break;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * kAttnBlock;
    for (int64_t j = 0; j < nt; ++j) {
      for (int64_t d = dv; d < c.D; ++d) sg[j] += c.q[g * c.D + d] * load_val<V>(c.k, (t0 + j) * c.D + d);
    }
    // pad the block to whole vectors with -inf (exp gives 0)
    for (int64_t jj = nt; jj < kAttnBlock && jj % kVL; ++jj) sg[jj] = ninf;
  }
  const int64_t ntv = (nt + kVL - 1) / kVL * kVL;
  // online softmax update per query row; s becomes the probabilities p
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * kAttnBlock;
    float bm = ninf;
    for (int64_t j = 0; j < nt; ++j) bm = sg[j] > bm ? sg[j] : bm;
    const float m_new = c.m[g] > bm ? c.m[g] : bm;
    const float corr = c.m[g] == ninf ? 0.f : exp_neg1(c.m[g] - m_new);
    vfl lsum = vfl{};
    for (int64_t j = 0; j < ntv; j += kVL) {
      const vfl p = exp_neg(*reinterpret_cast<const vflu_a*>(sg + j) - m_new);
      *reinterpret_cast<vflu_a*>(sg + j) = p;
      lsum += p;
    }
    c.l[g] = c.l[g] * corr + hsum_vfl(lsum);
    c.m[g] = m_new;
    if (corr != 1.f) {
      float* ag = c.acc + g * D;
      for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
    }
  }
  // acc_g += p_gj * v_j, each value row loaded once for the G rows
  if (G <= kMaxRegGroup) {
    accumulate_values_reg<V>(c, s, t0, nt, dv);
  } else {
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t r0 = (t0 + j) * D;
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
    const int64_t r0 = (t0 + j) * D;
    for (int64_t d = dv; d < D; ++d) {
      const float vv = load_val<V>(c.v, r0 + d);
      for (int64_t g = 0; g < G; ++g) c.acc[g * D + d] += s[g * kAttnBlock + j] * vv;
    }
  }
}

template <VT V>
void attn_chunk_impl(const AttnChunk& c) {
  init_partial(c);
  for (int64_t pc = 0; pc < c.np; ++pc) {
    const int64_t start = c.pieces[2 * pc], len = c.pieces[2 * pc + 1];
    for (int64_t t0 = start; t0 < start + len; t0 += kAttnBlock) attn_block<V>(c, t0, min64(kAttnBlock, start + len - t0));
  }
}

// Compressed tokens [t0, t1) (decode_attention.h, SparseKvChunk): each block of 64 tokens is expanded
// into dense float32 rows (zeros where a channel was pruned) and goes through attn_block.
template <VT V>
void sparse_chunk_impl(const SparseKvChunk& c) {
  const int64_t D = c.base.D, W = c.words, keep = c.keep;
  AttnChunk dense = c.base;
  dense.k = c.kbuf;
  dense.v = c.vbuf;
  init_partial(dense);
  for (int64_t t0 = c.t0; t0 < c.t1; t0 += kAttnBlock) {
    const int64_t nt = min64(kAttnBlock, c.t1 - t0);
    for (int which = 0; which < 2; ++which) {
      const void* vals = which ? c.vvals : c.kvals;
      const uint64_t* bits = which ? c.vbits : c.kbits;
      float* out = which ? c.vbuf : c.kbuf;
      for (int64_t j = 0; j < nt; ++j) {
        float* row = out + j * D;
        for (int64_t d = 0; d < D; ++d) row[d] = 0.f;
        int64_t i = (t0 + j) * keep;
        for (int64_t w = 0; w < W; ++w) {
          for (uint64_t b = bits[(t0 + j) * W + w]; b; b &= b - 1) row[w * 64 + __builtin_ctzll(b)] = load_val<V>(vals, i++);
        }
      }
    }
    attn_block<VT::f32>(dense, 0, nt);
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
