// Sparse-input linear kernels compiled for AVX2 (the generic code of sparse_input_kernels.h at this file's vector width).
#include "sparse_input_kernels.h"

namespace sf {
namespace avx2 {
extern const SparseInputKernels sparse_input_kernels = kSparseInputKernels;
}  // namespace avx2
}  // namespace sf
