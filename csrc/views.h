// Checked views of the caller's weight buffers, one builder per format (the layouts are documented
// in csr.h, bitmap.h, nm.h, fanin.h, bsr.h). Each checks dtypes, shapes and lengths, and with
// check_indices every index and row pointer too (buffers.h), so that no kernel of the format reads
// outside the buffers or outside x; it throws InvalidWeight ("<op>: <what is wrong>") otherwise.
// `cols` is in_features (CSR and fan-in do not record it); `op` names the calling op in messages.
// check_indices = false skips the O(stored entries) scans for buffers already checked (a format
// object validated once, see sparseforge.ops._define.FormatOps.kernel_args).
#pragma once

#include "bitmap.h"
#include "bsr.h"
#include "buffers.h"
#include "csr.h"
#include "fanin.h"
#include "nm.h"

namespace sf {

// row_ptr (rows + 1,) int32, col (nnz,) uint16/int32, values (nnz,) float32/bf16
CsrView csr_view(const Array& row_ptr, const Array& col, const Array& values, int64_t cols, const char* op,
                 bool check_indices = true);
// bitmap (rows, ceil(cols / 8)) uint8, row_offsets (rows + 1,) int64, values (nnz,)
BitmapView bitmap_view(const Array& bits, const Array& row_offsets, const Array& values, int64_t cols, const char* op,
                       bool check_indices = true);
// values (rows, cols / m * n), indices (rows, ceil(values_per_row * bits / 8)) uint8
NmView nm_view(const Array& values, const Array& indices, int n, int m, int64_t cols, const char* op,
               bool check_indices = true);
// values (rows, k), indices (rows, k) uint16/int32
FanInView fanin_view(const Array& values, const Array& indices, int64_t cols, const char* op, bool check_indices = true);
// block_row_ptr (rows / h + 1,) int32, block_col (nblocks,) uint16/int32, values (nblocks, h, w)
BsrView bsr_view(const Array& brp, const Array& bcol, const Array& values, int64_t rows, int64_t cols, const char* op,
                 bool check_indices = true);

}  // namespace sf
