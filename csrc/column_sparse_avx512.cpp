// Column-sparse linear kernels compiled for AVX-512 (the generic code of column_sparse_kernels.h at this file's vector width).
#include "column_sparse_kernels.h"

namespace sf {
namespace avx512 {
extern const ColumnSparseKernels column_sparse_kernels = kColumnSparseKernels;
}  // namespace avx512
}  // namespace sf
