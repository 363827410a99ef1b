// Column-sparse linear kernels compiled for AVX-512 with AVX512_VBMI2 (picked by column_sparse.cpp
// where use_avx512_vbmi2()): the code of column_sparse_kernels.h, whose bfloat16 GEMV then expands
// 32 values per vpexpandw.
#include "column_sparse_kernels.h"

namespace sf {
namespace avx512vbmi2 {
extern const ColumnSparseKernels column_sparse_kernels = kColumnSparseKernels;
}  // namespace avx512vbmi2
}  // namespace sf
