// CSR kernels compiled for AVX2 (the code of csr_kernels.h at this file's vector width).
#include "csr_kernels.h"

namespace sf {
namespace avx2 {
extern const CsrKernels csr = kCsrKernels;
}  // namespace avx2
}  // namespace sf
