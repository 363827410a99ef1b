// Decode attention over a KV cache, reading only the token spans a sparsity policy selects.
//
// One new query token per sequence (decode), grouped-query attention (GQA: Hq query heads share
// Hkv key/value heads, group G = Hq / Hkv, query head h reads KV head h / G):
//   q      (B, Hq, D)            float32
//   k, v   (B, Hkv, cap, D)      float32 or bfloat16 (raw bits), tokens [0, n) valid
//   spans  (B, Hkv, S, 2) int32  per KV head: [start, length) token spans, ascending and disjoint,
//                                length 0 = unused slot; together they are the tokens attended
//   out    (B, Hq, D)            float32:
//     out[b, h] = sum_{t in spans[b, h / G]} softmax_t(scale * q[b, h] . k[b, h / G, t]) v[b, h / G, t]
//
// Algorithm (decode_attention): the selected tokens of each (b, KV head) are cut into chunks of
// `chunk` tokens (split-K, "flash-decoding"); a task streams one chunk's keys and values once for
// all G query heads of the group, with an online softmax (running max m, running sum l, rescaled
// accumulator), in blocks of 64 tokens: G x 64 scores, one vectorised exp per score, then the
// value rows are added into the G accumulators. The partial (m, l, acc) of the chunks are merged in
// chunk order, so results do not depend on the thread count. The chunk size depends on the shapes
// only. No fast-math: a NaN in q propagates; exp underflows to 0 below -87.3.
#pragma once

#include <vector>

#include "common.h"

namespace sf {

struct DecodeAttnProblem {
  const float* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  VT vt = VT::f32;
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0;
  int64_t cap = 0;  // tokens allocated per (b, KV head): row stride cap * D
  int64_t n = 0;    // valid tokens; spans must lie in [0, n)
  const int32_t* spans = nullptr;
  int64_t S = 0;  // span slots per (b, KV head)
  float scale = 1.f;
  float* out = nullptr;
  float* lse = nullptr;  // (B, Hq) or null: log of the softmax denominator, log sum_t exp(scale * q . k_t)
};

// One chunk of one (b, KV head): its G query rows (pre-scaled), its keys / values, its spans.
struct AttnChunk {
  const float* q = nullptr;  // (G, D), already multiplied by scale
  const void* k = nullptr;   // (cap, D) of this KV head
  const void* v = nullptr;
  int64_t G = 0, D = 0;
  const int32_t* pieces = nullptr;  // (np, 2): [start, length) token ranges of the chunk
  int64_t np = 0;
  float* m = nullptr;    // (G,) running max of the scores, out
  float* l = nullptr;    // (G,) sum of exp(score - m), out
  float* acc = nullptr;  // (G, D) sum of exp(score - m) * v, out
  float* scratch = nullptr;  // (G, 64) scores of a block
};

using AttnChunkFn = void (*)(const AttnChunk& c);

// Compressed tokens [t0, t1) of one (b, KV head): token t keeps exactly `keep` channels of its key
// (and of its value), listed by bitmap words kbits[t * words ..] (bit d of word w: channel 64 w + d)
// with the kept values in channel order at kvals[t * keep ..] (Mustafar's per-token pruning).
struct SparseKvChunk {
  AttnChunk base;  // q, G, D, m, l, acc, scratch (k, v, pieces unused)
  const void* kvals = nullptr;
  const void* vvals = nullptr;
  const uint64_t* kbits = nullptr;
  const uint64_t* vbits = nullptr;
  int64_t keep = 0, words = 0, t0 = 0, t1 = 0;
  float* kbuf = nullptr;  // (64, D) expanded rows
  float* vbuf = nullptr;
  float* qbuf = nullptr;  // (G, D) the query rows reordered (the AVX-512 direct path's word order)
  // out: 2 t + 1 (value) or 2 t (key) of the first token whose bitmap does not mark exactly `keep`
  // channels below D (its values are not read; the chunk stops there), else left as it is
  int64_t* bad = nullptr;
};
using SparseChunkFn = void (*)(const SparseKvChunk& c);
// score[p] = qpos . kmax[p] + qneg . kmin[p] for p < pages (rows of D; kmin / kmax f32 or bf16)
using PageScoreFn = void (*)(const float* qpos, const float* qneg, const void* kmin, const void* kmax, int64_t pages,
                             int64_t D, float* score);
#define SF_DECODE_ATTENTION_KERNELS                                                                    \
  extern const AttnChunkFn attn_chunk_f32, attn_chunk_bf16;                                            \
  extern const PageScoreFn page_score_f32, page_score_bf16;                                            \
  extern const SparseChunkFn sparse_chunk_f32, sparse_chunk_bf16;
namespace scalar { SF_DECODE_ATTENTION_KERNELS }
namespace avx2 { SF_DECODE_ATTENTION_KERNELS }
namespace avx512 { SF_DECODE_ATTENTION_KERNELS }
#undef SF_DECODE_ATTENTION_KERNELS
// avx512 + VBMI2 (use_avx512_vbmi2): the bfloat16 compressed chunks expanded 32 channels per vpexpandw
namespace avx512vbmi2 { extern const SparseChunkFn sparse_chunk_bf16; }

// Throws std::invalid_argument for bad sizes, a span outside [0, n), spans out of order or
// overlapping, or a KV head with no token selected. chunk: tokens per task (0 = automatic, 512).
void decode_attention(const DecodeAttnProblem& p, Isa isa, int64_t chunk = 0, bool parallel = true);
// Scalar reference (the test oracle): two passes per query head (max, then exp-sum), std::exp.
void decode_attention_ref(const DecodeAttnProblem& p);

// Decode attention over per-token pruned, compressed keys and values (Mustafar, Joo et al. 2025):
// tokens [0, n) of each (b, KV head) stored as SparseKvChunk describes, kvals / vvals (B, Hkv, cap, keep)
// f32 or bf16, kbits / vbits (B, Hkv, cap, words) uint64; optionally also the dense tokens [r0, r1) of
// k / v (B, Hkv, kcap, D) of the same type in the same softmax (Mustafar's recent window: one call,
// one merge of the chunks); out (B, Hq, D) and lse (B, Hq, or null) as in DecodeAttnProblem.
struct SparseKvProblem {
  const float* q = nullptr;
  const void* kvals = nullptr;
  const void* vvals = nullptr;
  const uint64_t* kbits = nullptr;
  const uint64_t* vbits = nullptr;
  VT vt = VT::f32;
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0, cap = 0, keep = 0, n = 0;
  float scale = 1.f;
  float* out = nullptr;
  float* lse = nullptr;
  const void* k = nullptr;  // null: no dense tokens
  const void* v = nullptr;
  int64_t kcap = 0, r0 = 0, r1 = 0;
};

// Throws std::invalid_argument for bad sizes or a token whose bitmap does not hold exactly `keep` bits
// (checked per token inside the chunks, before its values are read).
void sparse_kv_attention(const SparseKvProblem& p, Isa isa, int64_t chunk = 0, bool parallel = true);
// Scalar reference: expands every token (then the dense ones), two passes per query head, std::exp.
void sparse_kv_attention_ref(const SparseKvProblem& p);

// The drivers' building blocks (quest_attention.cpp runs them too): the chunk and page-score kernels
// of an ISA and value type, and the merge of chunk partials (m, l, acc) per (b, KV head) bh, its
// chunks [head_first[bh], head_first[bh + 1]) merged in chunk order into out (BH * G, D) and lse (or null).
AttnChunkFn attn_chunk_kernel(Isa isa, VT vt);
PageScoreFn page_score_kernel(Isa isa, VT vt);
void merge_chunks(const float* pm, const float* pl, const float* pacc, const std::vector<int64_t>& head_first, int64_t G,
                  int64_t D, float* out, float* lse);

// Quest page selection (Tang et al., ICML 2024) per (b, KV head), the group's query heads summed:
//   score[p] = sum_{g in group} sum_d max(q_gd kmax[p, d], q_gd kmin[p, d])
//            = (sum_g relu(q_g)) . kmax[p] + (sum_g min(q_g, 0)) . kmin[p]
// over the candidate pages p < pages; chosen (B, Hkv, keep) gets the `keep` pages of highest score
// (ties: the lower page), ascending.
struct QuestSelectProblem {
  const float* q = nullptr;  // (B, Hq, D)
  const void* kmin = nullptr;  // (B, Hkv, pcap, D)
  const void* kmax = nullptr;
  VT vt = VT::f32;
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0, pcap = 0;
  int64_t pages = 0, keep = 0;  // 0 <= keep <= pages <= pcap
  int32_t* chosen = nullptr;
};

void quest_select(const QuestSelectProblem& p, Isa isa, bool parallel = true);
// Scalar reference: plain loops, max(q * M, q * m) per channel as the paper writes it.
void quest_select_ref(const QuestSelectProblem& p);

}  // namespace sf
