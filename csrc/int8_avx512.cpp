// int8-valued bitmap / N:M kernels compiled for AVX512 (the code of int8_kernels.h at this file's vector width).
#include "int8_kernels.h"

namespace sf {
namespace avx512 {
extern const I8Kernels i8 = kI8Kernels;
}  // namespace avx512
}  // namespace sf
