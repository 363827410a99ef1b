// N:M kernels compiled for AVX-512 with AVX512_VPOPCNTDQ (picked by kernels() in nm.cpp where the CPU has it) (the code of nm_kernels.h at this file's vector width).
#include "nm_kernels.h"

namespace sf {
namespace avx512vp {
extern const NmKernels nm = kNmKernels;
}  // namespace avx512vp
}  // namespace sf
