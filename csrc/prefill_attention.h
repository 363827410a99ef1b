// Block-sparse causal prefill attention: many query tokens at once over a KV cache, skipping the
// key blocks a static pattern leaves out (TriangleMix's Triangle attention, He et al. 2025,
// "TriangleMix: A Lossless and Efficient Attention Pattern for Long Context Prefilling"), or dense.
//
// Grouped-query attention (query head h reads KV head h / G, G = Hq / Hkv). The Tq queries are the
// last Tq of the n cached tokens: query row r sits at position i = n - Tq + r.
//   q      (B, Hq, Tq, D)        float32
//   k, v   (B, Hkv, cap, D)      float32 or bfloat16 (raw bits), tokens [0, n) valid
//   out    (B, Tq, Hq, D)        float32 (the layout transformers' attention functions return):
//     out[b, r, h] = sum_{j allowed(i, j)} softmax_j(scale * q[b, h, r] . k[b, h / G, j]) v[b, h / G, j]
// with the pattern
//   allowed(i, j) = j <= i  and  i - j < horizon  and  (j < sinks  or  i - j < window  or  i >= n - last)
// (sinks: the first tokens every query sees; window: the local band, the diagonal included; last:
// the final query rows attend to every earlier token; horizon: the model's own sliding window).
// Dense causal attention is sinks = 0, window >= n, last = 0, horizon >= n. The diagonal is always
// allowed, so no row is empty.
//
// Algorithm (prefill_attention): keys are first transposed into blocks of 128 tokens, (D, 128)
// each, float32. A task is one (b, query head, block of 256 query rows, 64 for a narrow band: a
// key block is read once per task); it visits only the key blocks that hold an allowed key of one
// of its rows (at most two key ranges: the sinks, and the band from the oldest window key to the
// diagonal; all earlier keys for blocks holding last rows), computes the block's scores
// S = Q K^T with a register-blocked product (6 rows x 4 vectors of keys), masks it only where the
// block is not entirely allowed (two key spans per row), updates the online softmax (running max,
// running sum, rescaled output rows) and adds P V with the same product. Tasks go to the thread
// pool, the costliest query blocks first. Results do not depend on the thread count. No
// fast-math: a NaN in q or k propagates.
#pragma once

#include "common.h"

namespace sf {

struct PrefillAttnProblem {
  const float* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  VT vt = VT::f32;
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0;
  int64_t Tq = 0;   // query rows per (b, head)
  int64_t cap = 0;  // tokens allocated per (b, KV head): row stride cap * D
  int64_t n = 0;    // valid tokens, Tq <= n <= cap
  int64_t sinks = 0, window = 0, last = 0, horizon = 0;  // the pattern (see above); window, horizon >= 1
  float scale = 1.f;
  float* out = nullptr;
};

constexpr int64_t kPrefillBlock = 128;  // keys per key block
constexpr int64_t kPrefillRows = 256;     // query rows per task, dense or wide patterns
constexpr int64_t kPrefillBandRows = 64;  // query rows per task, band patterns (window < n / 2)

// One key block visited by one query block: rows [0, rows) of the task against keys
// [k0 + c0, k0 + c1) (c0, c1 multiples of 16, c1 <= kPrefillBlock).
struct PrefillTile {
  const float* qs = nullptr;  // (rows, D) query rows times scale, rows <= kPrefillRows
  const float* kt = nullptr;  // (D, kPrefillBlock) transposed keys of the block, zero past n
  const void* v = nullptr;    // (cap, D) values of the KV head
  int64_t rows = 0, D = 0, k0 = 0, c0 = 0, c1 = 0;
  int64_t kv_cols = 0;   // columns whose value rows exist (keys < n): c0 <= kv_cols <= c1
  // per row r, the allowed keys of the tile are [k0 + span[4r], k0 + span[4r + 1]) and
  // [k0 + span[4r + 2], k0 + span[4r + 3]) (column offsets, possibly empty); null: every key allowed
  const int32_t* span = nullptr;
  float* s = nullptr;    // (rows, kPrefillBlock) scratch: scores, then probabilities
  float* m = nullptr;    // (rows,) running max
  float* l = nullptr;    // (rows,) running sum of exp
  float* acc = nullptr;  // (rows, D) running sum of p * v
};

using PrefillTileFn = void (*)(const PrefillTile& t);
#define SF_PREFILL_ATTENTION_KERNELS extern const PrefillTileFn prefill_tile_f32, prefill_tile_bf16;
namespace scalar { SF_PREFILL_ATTENTION_KERNELS }
namespace avx2 { SF_PREFILL_ATTENTION_KERNELS }
namespace avx512 { SF_PREFILL_ATTENTION_KERNELS }
#undef SF_PREFILL_ATTENTION_KERNELS

// bf16 compute over bfloat16 K/V (prefill_attention with an avx512_bf16 or amx Bf16Path): the same
// tasks, key blocks and masks; the products run on bf16 pairs with float32 accumulation
// (vdpbf16ps, or AMX TDPBF16PS tiles), the queries rounded to bf16 and the probabilities rounded to
// bf16 before P V (as flash attention in bf16 does); the online softmax (scale, max, exp, sums) and
// the output accumulators stay float32. One tile covers up to kPrefillRows query rows, walked in
// groups of kPrefillBf16Group rows (scores, softmax and P V of a group stay in L1). Layouts:
//   qb   (rows rounded up to 16, Dp) bf16, zero past D and past the task's rows; Dp = D rounded up to 32
//   kp   (Dp / 2, kPrefillBlock) dwords per key block: dword (d, c) = (k[c, 2d], k[c, 2d + 1]), low half first
//   vp   (kPrefillBlock / 2, Dv) dwords per key block: dword (c, d) = (v[2c, d], v[2c + 1, d]); Dv = D rounded up to 16
// (both zero past n and past D); acc (rows rounded up to 16, Dv) float32. A scale of 0 gives uniform
// weights over the allowed keys even where q or k holds NaN / inf (the queries are zeroed).
constexpr int64_t kPrefillBf16Group = 32;  // query rows per softmax group (two AMX row tiles)
constexpr int64_t kPrefillBf16Align = 32;  // tile columns start and end on multiples of one AMX k step

struct PrefillBf16Tile {
  const uint16_t* qb = nullptr;
  const uint32_t* kp = nullptr;  // the key block's pairs
  const uint32_t* vp = nullptr;  // the value block's pairs
  int64_t rows = 0, Dp = 0, Dv = 0, c0 = 0, c1 = 0;  // c0, c1 multiples of kPrefillBf16Align
  float scale = 1.f;               // > 0: the driver folds a sign (or a zero) into qb
  const int32_t* span = nullptr;  // as PrefillTile::span; null: every key of [c0, c1) allowed
  float* s = nullptr;             // (2, kPrefillBf16Group, kPrefillBlock) scores of two groups
  uint16_t* pb = nullptr;         // (kPrefillBf16Group, kPrefillBlock) bf16 probabilities, zero-filled by the caller
  float* m = nullptr;             // (rows,) running max of the scaled scores
  float* l = nullptr;             // (rows,) running sum of exp
  float* acc = nullptr;           // (rows rounded up to 16, Dv) running sum of p * v
};

using PrefillBf16TileFn = void (*)(const PrefillBf16Tile& t);
namespace avx512bf16 { extern const PrefillBf16TileFn prefill_tile_bf16_compute; }  // vdpbf16ps
namespace amx { extern const PrefillBf16TileFn prefill_tile_bf16_compute; }         // AMX-BF16 tiles

enum class Bf16Path : int;  // linear_bf16.h: scalar, avx512_bf16, amx

// Throws std::invalid_argument for bad sizes or pattern parameters.
void prefill_attention(const PrefillAttnProblem& p, Isa isa, bool parallel = true);
// bfloat16 K/V with the bf16 compute path `path` (linear_bf16.h's Bf16Path, resolved by the caller:
// SPARSEFORGE_BF16_PATH); Bf16Path::scalar and float32 K/V run prefill_attention(p, isa, parallel),
// bf16 widened to float32. Throws std::invalid_argument for a path this machine cannot run.
void prefill_attention(const PrefillAttnProblem& p, Isa isa, Bf16Path path, bool parallel = true);
// Scalar reference (the test oracle): per query row, every key tested with allowed(i, j), two
// passes (max, then exp-sum) with std::exp.
void prefill_attention_ref(const PrefillAttnProblem& p);

}  // namespace sf
