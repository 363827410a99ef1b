// Sparse-input linear layer (activation sparsity, TEAL-style): y = x_s @ W + bias, where the input
// channels whose magnitude is at most a threshold are skipped, and W is stored input-channel-major
// so that a skipped channel is a skipped contiguous row of weights (its bytes are never read).
//
// Layout (C-contiguous):
//   x      (B, in)  float32
//   w      (in, out) float32 or bfloat16 (raw bits), row i = the weights input channel i feeds
//   thr    (1,) or (in,) float32: one threshold for the layer, or one per input channel
//   bias   (out,) float32 or null
//   y      (B, out) float32, overwritten
// Channel i of row b is skipped iff |x[b, i]| <= thr_i; a skipped channel contributes 0, an active
// one x[b, i] * W[i, :]. The sparse GEMV never reads a skipped channel's weights (NaN / inf there
// change nothing); the masked GEMM multiplies them by 0 (0 for finite weights). NaN is never skipped (NaN <= t is false), so
// NaN propagates as in the dense product; thr = 0 skips exact zeros only (lossless), thr = +inf
// skips every finite value. Accumulation is float32, channels added in ascending order.
//
// Algorithm (sparse_input_linear): each row's active channels are compacted into (index, value)
// lists. When the active channels of all rows together are fewer than `in` (decode: one row, or a
// few sparse rows), every row runs the sparse GEMV: threads own tiles of output columns (no atomics)
// and, per tile, add xv[k] * W[idx[k], tile] four channels at a time, so each active channel streams
// one contiguous run of the tile's weights and no inactive channel is touched. Otherwise (prefill)
// the rows are masked (skipped channels set to 0) and a register-blocked GEMM over the same
// [in, out] layout runs: threads own column tiles, the weights are walked in blocks of input
// channels that stay in L2 while every row block reads them. Results do not depend on the thread
// count. No fast-math: NaN / inf propagate.
#pragma once

#include "common.h"

namespace sf {

struct SparseInputProblem {
  const float* x = nullptr;
  int64_t B = 0, in = 0, out = 0;
  const void* w = nullptr;
  VT wt = VT::f32;
  const float* thr = nullptr;
  bool thr_per_channel = false;  // thr has `in` entries (else 1)
  const float* bias = nullptr;
  float* y = nullptr;
};

// One ISA's building blocks (sparse_input_kernels.h, compiled once per ISA).
struct SparseInputKernels {
  // idx[0:n], xv[0:n] = the active channels of x (in,) and their values, ascending; returns n.
  // idx and xv need `in` + 16 entries of room.
  int64_t (*compact)(const float* x, int64_t in, const float* thr, bool per_channel, int32_t* idx, float* xv);
  // acc[0:cw] += sum_k xv[k] * W[idx[k], j0:j0+cw] (W row stride ld, element type vt)
  void (*gemv_tile)(const void* w, VT vt, int64_t ld, const int32_t* idx, const float* xv, int64_t n, int64_t j0,
                    int64_t cw, float* acc);
  // y[r, j0:j0+cw] += xm[r, k0:k1] @ W[k0:k1, j0:j0+cw] for r < rows (xm row stride xld, y row stride yld)
  void (*gemm_tile)(const void* w, VT vt, int64_t ld, const float* xm, int64_t xld, int64_t rows, int64_t k0,
                    int64_t k1, int64_t j0, int64_t cw, float* y, int64_t yld);
};

namespace scalar { extern const SparseInputKernels sparse_input_kernels; }
namespace avx2 { extern const SparseInputKernels sparse_input_kernels; }
namespace avx512 { extern const SparseInputKernels sparse_input_kernels; }

// Throws std::invalid_argument for bad sizes or a negative / NaN threshold.
// algo: 0 auto, 1 sparse GEMV per row, 2 masked GEMM. parallel: use the thread pool.
void sparse_input_linear(const SparseInputProblem& p, Isa isa, int algo = 0, bool parallel = true);
// Scalar reference (the test oracle): plain loops, float32 sums in ascending channel order.
void sparse_input_linear_ref(const SparseInputProblem& p);
// Active channels per row: counts[b] = #{i : not |x[b, i]| <= thr_i} (the measured density).
void sparse_input_count(const SparseInputProblem& p, int64_t* counts);

}  // namespace sf
