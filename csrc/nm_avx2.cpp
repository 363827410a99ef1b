// N:M kernels compiled for AVX2 (the code of nm_kernels.h at this file's vector width).
#include "nm_kernels.h"

namespace sf {
namespace avx2 {
extern const NmKernels nm = kNmKernels;
}  // namespace avx2
}  // namespace sf
