// One Quest decode step in one call: page scores, top-k page selection and the attention over the
// chosen pages (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
// ICML 2024; mit-han-lab/Quest), per (b, KV head).
//
// Shapes (decode_attention.h for q, k, v, out, lse; the page bounds as in QuestSelectProblem):
//   q            (B, Hq, D)        float32
//   k, v         (B, Hkv, cap, D)  float32 or bfloat16, tokens [0, n) valid, pages of `page` tokens
//   kmin, kmax   (B, Hkv, pcap, D) float32 or bfloat16: per page and channel the key minimum / maximum
//   out          (B, Hq, D)        float32;  lse (B, Hq) float32 or null;  chosen (B, Hkv, read - 1) or null
// With npages = ceil(n / page) and full = npages - 1 candidate pages (all but the newest), per
// (b, KV head), its group of G = Hq / Hkv query heads summed:
//   score[p] = (sum_g relu(q_g)) . kmax[p] + (sum_g min(q_g, 0)) . kmin[p]    for p < full
//   chosen   = the read - 1 pages of highest score (ties: the lower page; NaN above every number), ascending
//   out      = softmax attention of each query head over the tokens of the chosen pages plus the
//              newest page [full * page, n)
// which is quest_select over the first `full` pages plus decode_attention over those spans.
//
// Algorithm: a task per (b, KV head) on the thread pool scores its pages (vectorised), selects by a
// threshold pass (nth_element on a copy of the scores finds the (read - 1)-th highest score, then one
// pass in page order takes every page above it and the first pages equal to it: the pages come out
// ascending, no sort of everything), then attends over the chosen pages in one chunk (the decode
// kernel's online softmax in 64-token blocks, four 16-token pages a block, next block prefetched).
// With fewer (b, KV head) pairs than threads, the selections run first and the attention then runs
// split into 512-token chunks (decode_attention). Results do not depend on the thread count.
#pragma once

#include "common.h"

namespace sf {

struct QuestAttnProblem {
  const float* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  VT vt = VT::f32;  // of k, v
  const void* kmin = nullptr;
  const void* kmax = nullptr;
  VT bvt = VT::bf16;  // of kmin, kmax
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0;
  int64_t cap = 0, pcap = 0;  // tokens / pages allocated per (b, KV head)
  int64_t n = 0;              // valid tokens
  int64_t page = 16;          // tokens per page
  int64_t read = 0;           // pages read per (b, KV head), the newest included: 1 <= read <= npages - 1 + 1
  float scale = 1.f;
  float* out = nullptr;
  float* lse = nullptr;      // optional
  int32_t* chosen = nullptr;  // optional (B, Hkv, read - 1)
};

// Throws std::invalid_argument for bad sizes (n < 1, page < 1, pcap < npages, read < 1 or
// read > npages: a budget covering the context is dense, call decode_attention).
void quest_attention(const QuestAttnProblem& p, Isa isa, bool parallel = true);
// Scalar reference: quest_select_ref over the first npages - 1 pages, then decode_attention_ref over
// the chosen pages and the newest one.
void quest_attention_ref(const QuestAttnProblem& p);

// chosen[0:keep] = the `keep` highest of score[0:n] (ties: the lower index; NaN above every number),
// ascending; tmp: n floats of scratch. The threshold pass of quest_attention.
void select_top(const float* score, int64_t n, int64_t keep, float* tmp, int32_t* chosen);

}  // namespace sf
