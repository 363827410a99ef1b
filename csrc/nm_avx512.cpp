// N:M kernels compiled for AVX-512 (the code of nm_kernels.h at this file's vector width).
#include "nm_kernels.h"

namespace sf {
namespace avx512 {
extern const NmKernels nm = kNmKernels;
}  // namespace avx512
}  // namespace sf
