// bf16 compute for the column-sparse linear layer (column_sparse.h) at batch > 1:
// y (B, out) = bf16(mask(x)) @ bf16(W)^T + bias, float32 accumulation, on the same stored layout
// (per input channel a bitmap over the outputs + packed float32 or bfloat16 values).
//
// Masking is the float32 kernel's: channel i of row b is skipped iff |x[b, i]| <= thr_i (NaN never
// is), decided on the float32 x; the kept values are then rounded to bf16 (nearest even).
//
// Algorithm, per block of up to kColBf16Batch rows:
//   1. the channels active in at least one row (the union U, ascending) are listed and the masked
//      rows packed over U only: xa bf16 [round16(bn)][kp] (row stride kp + 32), kp = round32(|U|),
//      zero padded. A channel inactive in every row of the block is never read (K-dimension skipping);
//   2. threads own 512-output blocks; per 128 outputs (two bitmap words per channel) and per
//      kColBf16Chunk channels of U, each channel's bitmap bits expand its packed values
//      (AVX512_VBMI2 vpexpandw, via the bf16 panel product's decoder, linear_bf16_kernels.h) and
//      channel pairs are interleaved into a VNNI panel: panel[q][2n + h] = W[j + n, U[k0 + 2q + h]]
//      (q a channel pair, n < 128 an output). Two panels: the next one is decoded between the
//      multiply's steps (the tile unit works while the core decodes);
//   3. the panel multiplies every row of xa on the bf16 path (linear_bf16.h, Bf16Path):
//        amx          TDPBF16PS: A = 16 rows x 32 channels of xa, B = 16 channel pairs x 16 outputs
//                     of the panel, four 16x16 float32 accumulator tiles (32 rows x 32 outputs) per pass
//        avx512_bf16  vdpbf16ps: a channel pair of x broadcast against 16 outputs' weight pairs
//        scalar       plain C++ (bf16 widened to float32)
// A channel active in some rows of the block is zero in the others: its weights are multiplied by
// that 0 (as in a dense bf16 matmul). The result does not depend on the thread count. AMX and
// vdpbf16ps treat bf16 subnormals as zero (the scalar path does not).
#pragma once

#include "column_sparse.h"
#include "linear_bf16.h"

namespace sf {

constexpr int64_t kColBf16Outs = 128;    // outputs per decoded panel: two bitmap words per channel
constexpr int64_t kColBf16Chunk = 256;   // channels per panel: 128 pairs x 512 bytes = 64 KB (L2)
constexpr int64_t kColBf16Batch = 64;    // rows per packed activation block
constexpr int64_t kColBf16PanelBytes = kColBf16Chunk / 2 * kColBf16Outs * 2 * 2;
constexpr int64_t kColBf16AccBytes = kColBf16Batch * kColBf16Outs * 4;

// One packed block of rows [b0, b0 + bn) and the problem it belongs to.
struct ColBf16Tile {
  const uint16_t* xa = nullptr;  // bf16 [nbt * 16][ldx]: masked x over the union channels (zero from nu on)
  const int32_t* chan = nullptr; // the union channels U (nu,), ascending
  int64_t nu = 0, kp = 0, ldx = 0, nbt = 0, b0 = 0, bn = 0;  // kp = round32(nu); ldx = kp + 32 (no 4 KB aliasing of the rows)
  const ColumnSparseProblem* p = nullptr;
};

// y[b0 : b0 + bn, j0 : j0 + cw] for one 512-output block (j0 a multiple of kColBlock, cw <= kColBlock).
// scratch: column_sparse_bf16_scratch(in) bytes, 64-aligned.
struct ColumnSparseBf16Kernels {
  void (*block)(const ColBf16Tile& t, int64_t j0, int64_t cw, void* scratch);
};

inline int64_t column_sparse_bf16_scratch(int64_t in) {
  return 2 * kColBf16PanelBytes + kColBf16AccBytes + (in + 8) * 8;  // two panels, acc, value cursors
}

namespace scalar { extern const ColumnSparseBf16Kernels column_sparse_bf16; }
namespace avx512bf16 { extern const ColumnSparseBf16Kernels column_sparse_bf16; }  // AVX512_BF16 + VBMI2
namespace amx { extern const ColumnSparseBf16Kernels column_sparse_bf16; }         // the above + AMX

// Dispatched, multithreaded; a path this machine cannot run throws std::invalid_argument.
void column_sparse_linear_bf16(const ColumnSparseProblem& p, Bf16Path path, bool parallel = true);
// The oracle: column_sparse_linear_ref's loops on the kept x values and the weights rounded to bf16.
void column_sparse_linear_bf16_ref(const ColumnSparseProblem& p);

}  // namespace sf
