// Column-sparse linear layer: activation sparsity times weight sparsity. y = x_s @ W^T + bias, where
// the input channels with |x| <= threshold are skipped (as in sparse_input.h) and W (out, in) is
// stored per input channel as a bitmap plus packed kept values (sparseforge.formats.colbitmap), so
// a skipped channel costs no bytes and an active one costs its kept values plus out / 8 bitmap
// bytes: bytes ~ (1 - s_act) * ((1 - s_w) * value size + 1/8) per weight.
//
// Layout (C-contiguous; `words` = ceil(out / 64), `nblk` = ceil(out / 512)):
//   x         (B, in) float32
//   bitmap    (in, words) 64-bit words (little endian): bit j % 64 of word j / 64 of channel i is
//             set iff W[j, i] is stored; bits past `out` are 0
//   block_ptr (in * nblk + 1,) int64: entry i * nblk + b = stored values before (channel i, output
//             512 * b) in channel-major order; the last entry is nnz
//   values    (nnz,) float32, bfloat16 (raw bits) or int8: channel 0's kept weights by ascending
//             output, then channel 1's, ...
//   scales    (out,) float32, int8 values only: W[j, i] = scales[j] * q; finite and > 0
//   thr       (1,) or (in,) float32; bias (out,) float32 or null; y (B, out) float32, overwritten
// A channel is skipped iff |x[b, i]| <= thr_i (NaN never is); thr = 0 skips exact zeros only,
// +inf every finite input. Accumulation is float32, channels added in ascending order.
// int8 values: the sums acc[j] = sum_i x_i * q[j, i] (q widened to float32 in registers) are
// formed as for float values, and each output is y[j] = scales[j] * acc[j] + bias[j] at the end of
// its tile (GEMV and decoded-panel GEMM alike: the panel holds q, the scale is applied to the sums).
//
// Algorithm (column_sparse_linear): each row's active channels are compacted into (index, value)
// lists (the sparse-input compaction kernel). While the active channels of all rows together number
// at most `in` (decode), every row runs the GEMV: threads own tiles of whole 512-column blocks (no
// atomics); per tile and group of four or eight active channels, each channel's bitmap is read a
// vector's width at a time and the chunk expands the channel's next packed values into place
// (AVX-512: vexpandps; bfloat16 values with AVX512_VBMI2: vpexpandw over 32 outputs) and adds x_i
// times them to the tile's partial sums. Otherwise (prefill) the rows are
// masked and, per column tile, blocks of channels are decoded into a dense float32 panel in L2
// that the sparse-input GEMM multiplies by every row: one stored layout serves both. Results do
// not depend on the thread count. No fast-math: NaN / inf propagate.
#pragma once

#include "common.h"

namespace sf {

constexpr int64_t kColBlock = 512;  // output columns per block_ptr entry

struct ColumnSparseWeight {
  int64_t in = 0, out = 0;
  const uint64_t* bitmap = nullptr;  // (in, words)
  const int64_t* block_ptr = nullptr;  // (in * nblk + 1,)
  const void* values = nullptr;      // (nnz,)
  VT vt = VT::f32;
  const float* scales = nullptr;     // (out,), int8 values only
  int64_t nnz = 0;
  int64_t words() const { return (out + 63) / 64; }
  int64_t nblk() const { return (out + kColBlock - 1) / kColBlock; }
};

struct ColumnSparseProblem {
  const float* x = nullptr;
  int64_t B = 0;
  ColumnSparseWeight w;
  const float* thr = nullptr;
  bool thr_per_channel = false;
  const float* bias = nullptr;
  float* y = nullptr;
};

// One ISA's building blocks (column_sparse_kernels.h, compiled once per ISA).
struct ColumnSparseKernels {
  // acc[0:round64(cw)] += sum_k xv[k] * W[j0:j0+cw, idx[k]] (j0 a multiple of kColBlock; the
  // columns past cw, up to the next multiple of 64, receive zeros)
  void (*gemv_tile)(const ColumnSparseWeight& w, const int32_t* idx, const float* xv, int64_t n, int64_t j0,
                    int64_t cw, float* acc);
  // panel[(k - k0) * ld + j] = W[j0 + j, k] for k in [k0, k1), j < round64(cw) (zero where not stored)
  void (*decode_panel)(const ColumnSparseWeight& w, int64_t k0, int64_t k1, int64_t j0, int64_t cw, float* panel,
                       int64_t ld);
};

namespace scalar { extern const ColumnSparseKernels column_sparse_kernels; }
namespace avx2 { extern const ColumnSparseKernels column_sparse_kernels; }
namespace avx512 { extern const ColumnSparseKernels column_sparse_kernels; }
namespace avx512vbmi2 { extern const ColumnSparseKernels column_sparse_kernels; }  // avx512 + VBMI2 (use_avx512_vbmi2)

// Shapes, thresholds and that block_ptr starts at 0 and ends at nnz (cheap; every call).
// Throws std::invalid_argument.
void column_sparse_check_problem(const ColumnSparseProblem& p);
// Full buffer check (once per weight): block_ptr[i * nblk + b + 1] - block_ptr[i * nblk + b]
// equals the set bits of that block, no bit past `out` is set, and int8 values come with scales
// that are finite and > 0. Throws InvalidWeight.
void column_sparse_check_weight(const ColumnSparseWeight& w);
// algo: 0 auto, 1 GEMV per row, 2 decoded-panel GEMM. parallel: use the thread pool.
void column_sparse_linear(const ColumnSparseProblem& p, Isa isa, int algo = 0, bool parallel = true);
// Several products in one call, as for sibling projections of one input (q / k / v, gate / up), each
// with its own weight, thresholds, bias and output: every member's y is bitwise what
// column_sparse_linear(ps[m], isa) writes (the same active channels, channel parts and order), but
// batch-1 members (B = 1, GEMV) go to the thread pool as one job: their channel parts and column
// tiles are one task list, so the pool wakes and joins once. Members with B != 1 run one by one.
void column_sparse_linear_group(const ColumnSparseProblem* ps, int64_t count, Isa isa, bool parallel = true);
// The batch-1 walk that `isa` runs: "avx512_vbmi2" (AVX-512 with vpexpandw for bfloat16 values),
// "avx512", "avx2" or "scalar".
const char* column_sparse_walk(Isa isa);
// Scalar reference (the test oracle): plain loops over the bits, float32 sums in ascending channel order.
void column_sparse_linear_ref(const ColumnSparseProblem& p);

}  // namespace sf
