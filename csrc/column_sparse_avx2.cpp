// Column-sparse linear kernels compiled for AVX2 (the generic code of column_sparse_kernels.h at this file's vector width).
#include "column_sparse_kernels.h"

namespace sf {
namespace avx2 {
extern const ColumnSparseKernels column_sparse_kernels = kColumnSparseKernels;
}  // namespace avx2
}  // namespace sf
