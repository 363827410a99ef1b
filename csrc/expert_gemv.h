// Few-token mixture-of-experts FFN (decode): each routed expert's weights are read once for all
// the tokens that chose it, as matrix-vector products (GEMV) that stream the weights from memory.
//
// Layout (what sparseforge.moe.MoE stores, input-major, float32, C-contiguous):
//   x        (T, d)            the tokens
//   experts  (T, k) int64      expert of each routing slot, -1 = empty slot (dropped / padding)
//   weights  (T, k) float32    gate weight of each slot
//   w_gate   (E, d, h) or null GLU gate projection (null: plain MLP expert)
//   w_up     (E, d, h)
//   w_down   (E, h, d)
//   y        (T, d)            output, overwritten:
//     y[t] = sum over t's non-empty slots s (in slot order) of weights[s] * FFN_{experts[s]}(x[t])
//     FFN_e(v) = (act(v @ w_gate[e]) * (v @ w_up[e])) @ w_down[e]   (GLU; SwiGLU with silu)
//     FFN_e(v) = act(v @ w_up[e]) @ w_down[e]                        (MLP)
//
// Algorithm (expert_ffn): slots are grouped by expert (up to 4 slots per group), so an expert's
// weights are read once for all the tokens that chose it. Phase 1 streams w_up[e] (and w_gate[e])
// in contiguous blocks of whole rows (AXPY form on the input-major layout, partial sums cached);
// phase 2 sums the row blocks in block order, applies act(g) * u, and streams w_down[e] the same
// way; the gate-weighted sum over each token's slots follows in slot order. Block sizes depend on
// the shapes only, so results are bitwise the same for any thread count (parallel or not).
// No fast-math: NaN / inf propagate as in the dense products.
#pragma once

#include "common.h"
#include "threadpool.h"

namespace sf {

enum class Act : int { silu = 0, gelu = 1, gelu_tanh = 2, relu = 3 };

struct ExpertFfnProblem {
  const float* x = nullptr;
  int64_t T = 0, d = 0, h = 0, E = 0, k = 0;
  const int64_t* experts = nullptr;
  const float* weights = nullptr;
  const float* w_gate = nullptr;  // null: MLP expert
  const float* w_up = nullptr;
  const float* w_down = nullptr;
  float* y = nullptr;
  Act act = Act::silu;
};

// acc (n, cw) = xs (n, rows; row stride xs_ld) @ W[0:rows, j0:j0+cw] (row stride ld): one ISA's
// streaming GEMV for n in [1, 4] vectors.
using GemvColsFn = void (*)(const float* W, int64_t ld, int64_t rows, int64_t cw, const float* xs, int64_t xs_ld,
                            int n, float* acc, int64_t acc_ld);

// y (T, N) = x (T, d) @ W^T for an output-major W (N, d) (nn.Linear's weight layout): one vector
// dot product per (token, output). One ISA's kernel.
using RowDotsFn = void (*)(const float* W, int64_t N, int64_t d, const float* x, int64_t T, float* y);

namespace scalar { extern const GemvColsFn gemv_cols; extern const RowDotsFn row_dots; }
namespace avx2 { extern const GemvColsFn gemv_cols; extern const RowDotsFn row_dots; }
namespace avx512 { extern const GemvColsFn gemv_cols; extern const RowDotsFn row_dots; }

// Throws std::invalid_argument for an expert id outside [-1, E) or bad sizes.
// block_floats: weights streamed per task (0 = automatic, 2^20 floats). parallel: spread the
// tasks over the thread pool (false: run them all on the calling thread). after: how the pool's
// workers wait once the last job is done (park: sleep at once, the default: in a decode step the
// next work is torch's, whose threads need the cores; spin: poll ~0.2 ms for another kernel call).
void expert_ffn(const ExpertFfnProblem& p, Isa isa, int64_t block_floats = 0, bool parallel = true,
                AfterJob after = AfterJob::park);
// Scalar reference (the test oracle): plain loops, double-free float32 sums in row order.
void expert_ffn_ref(const ExpertFfnProblem& p);

// The router's logits of a decode step, y (T, N) = x (T, d) @ W^T with W (N, d) output-major, on
// the calling thread: a parallel matmul here makes the step wait for a second thread to wake (and
// to find a free core) for a product of a few microseconds. Throws std::invalid_argument for
// negative sizes. few_token_linear_ref: plain loops in index order (the test oracle).
void few_token_linear(const float* x, int64_t T, int64_t d, const float* W, int64_t N, float* y, Isa isa);
void few_token_linear_ref(const float* x, int64_t T, int64_t d, const float* W, int64_t N, float* y);

// A whole decode step of a softmax top-k MoE layer (Mixtral's router) in one call:
//   logits (T, E) = x @ router^T (few_token_linear), probs = softmax(logits) per token (float32,
//   max-subtracted), experts (T, k) = the k largest probs, best first, ties to the lower index (NaN
//   ranks first, as torch.sort), weights (T, k) = their probs (divided by their sum if renormalize),
//   counts (E,) = slots per expert, then y = expert_ffn of that routing.
// p.experts / p.weights are ignored (the routing above fills r.experts / r.weights and uses them).
struct DecodeRouting {
  const float* router = nullptr;  // (E, d), nn.Linear layout
  bool renormalize = true;
  float* logits = nullptr;        // (T, E)
  float* probs = nullptr;         // (T, E)
  int64_t* experts = nullptr;     // (T, k)
  float* weights = nullptr;       // (T, k)
  int64_t* counts = nullptr;      // (E,)
};
void expert_decode_step(ExpertFfnProblem p, const DecodeRouting& r, Isa isa, int64_t block_floats = 0,
                        bool parallel = true, AfterJob after = AfterJob::park);

}  // namespace sf
