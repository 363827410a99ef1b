// Sparse-input linear kernels compiled for AVX-512 (the generic code of sparse_input_kernels.h at this file's vector width).
#include "sparse_input_kernels.h"

namespace sf {
namespace avx512 {
extern const SparseInputKernels sparse_input_kernels = kSparseInputKernels;
}  // namespace avx512
}  // namespace sf
