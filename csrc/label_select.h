// Double Sparsity's token selection over a 4-bit label cache (Yang et al., "Post-Training Sparse
// Attention with Double Sparsity", 2024): approximate attention scores from the C label channels of
// every cached key, then the `budget` tokens with the largest scores, per (sequence, KV head).
//
//   q       (B, Hkv, C)            float32: the label channels of the query (summed over the GQA group)
//   codes   (B, Hkv, C, cap / 2)   uint8: 4-bit codes, per channel in blocks of 32 tokens (16 bytes):
//           token 32k + j (j < 16) in the low nibble of byte 16k + j, token 32k + 16 + j in its high nibble
//   scales  (B, Hkv, cap)          float32 per token: label value = (code - 8) * scale
//   scores  (B, Hkv, n)            float32: scores[b, h, t] = scale_t * sum_c q[b, h, c] (code_tc - 8)
//   chosen  (B, Hkv, budget)       int32: the budget highest-scoring tokens of [0, n), ascending; a NaN
//                                  score ranks above every number (as torch.topk), ties go to the older token
// cap is a multiple of 32, n <= cap, budget <= n. Scores are computed per 32-token block with the
// native vector (16 tokens per AVX-512 vector: one code byte holds two tokens 16 apart).
#pragma once

#include "common.h"

namespace sf {

struct LabelProblem {
  const float* q = nullptr;
  const uint8_t* codes = nullptr;
  const float* scales = nullptr;
  int64_t B = 0, Hkv = 0, C = 0, cap = 0, n = 0;
  float* scores = nullptr;
};

// scores of tokens [0, n) of one (b, h): q (C,), codes (C, capb = cap / 2) rows, scales (n), out (n)
using LabelScoreFn = void (*)(const float* q, const uint8_t* codes, const float* scales, int64_t C, int64_t capb,
                              int64_t n, float* out);
// the same scores, plus keys (n) = label_rank_key of each score and ++hist[key >> 16] per token
// (hist: 65536 counters, added to): the selection's first pass
using LabelKeyFn = void (*)(const float* q, const uint8_t* codes, const float* scales, int64_t C, int64_t capb,
                            int64_t n, float* out, uint32_t* keys, int32_t* hist);
#define SF_LABEL_SELECT_KERNELS extern const LabelScoreFn label_scores_row; extern const LabelKeyFn label_keys_row;
namespace scalar { SF_LABEL_SELECT_KERNELS }
namespace avx2 { SF_LABEL_SELECT_KERNELS }
namespace avx512 { SF_LABEL_SELECT_KERNELS }
#undef SF_LABEL_SELECT_KERNELS

// Throw std::invalid_argument for bad sizes.
void label_scores(const LabelProblem& p, Isa isa, bool parallel = true);
void label_scores_ref(const LabelProblem& p);  // scalar reference: per token, per channel, in double
// An unsigned key in the order of the scores: a larger float has a larger key, -0 ties with +0 and
// a NaN (any sign) is 0xffffffff, above +inf.
inline uint32_t label_rank_key(float f) {
  if (f != f) return 0xffffffffu;
  f += 0.f;  // -0 -> +0
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// label_scores, then the selection into chosen (B, Hkv, budget), threads over (b, h). Per (b, h):
// one pass over the label codes writes the scores, their rank keys and the histogram of the keys'
// high 16 bits (sign, exponent, 7 mantissa bits: scores of one magnitude still spread over many
// bins); the histogram gives the bin of the budget-th largest key; one branch-free pass over the keys
// lists, in token order, the tokens in that bin or above (the budget plus one bin); the exact
// threshold key comes from the bin's keys alone (nth_element) and the list is cut to the budget.
void label_select(const LabelProblem& p, int64_t budget, int32_t* chosen, Isa isa, bool parallel = true);
// Scalar reference of the selection (the test oracle) over given scores (rows, n): per row a stable
// sort of the tokens by descending rank key, the first budget, ascending, into chosen (rows, budget).
void label_select_ref(const float* scores, int64_t rows, int64_t n, int64_t budget, int32_t* chosen);
// dst (B, Hkv, k, D) = the rows idx (B, Hkv, k) of src (B, Hkv, cap, D), elements of elt bytes: the
// chosen tokens' keys or values made contiguous for the decode kernel; throws for an index outside [0, cap)
void gather_tokens(const void* src, int64_t elt, int64_t B, int64_t Hkv, int64_t cap, int64_t D, const int32_t* idx,
                   int64_t k, void* dst, bool parallel = true);

}  // namespace sf
