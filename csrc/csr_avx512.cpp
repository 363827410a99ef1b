// CSR kernels compiled for AVX-512 (the code of csr_kernels.h at this file's vector width).
#include "csr_kernels.h"

namespace sf {
namespace avx512 {
extern const CsrKernels csr = kCsrKernels;
}  // namespace avx512
}  // namespace sf
