// BSR kernels compiled for AVX512 (the generic code of bsr_kernels.h at this file's vector width).
#include "bsr_kernels.h"

namespace sf {
namespace avx512 {
extern const BsrKernels bsr = {bsr_rows, bsr_lanes, bsr_lanes_t, bsr_sddmm};
}  // namespace avx512
}  // namespace sf
