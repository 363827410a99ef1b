// int8-valued bitmap / N:M kernels compiled for AVX512 with VNNI, VBMI and VBMI2 (int8_kernels.h: the
// float32-activation kernels as in int8_avx512.cpp, and the vpdpbusd kernels of I8Act::int8).
#include "int8_kernels.h"

namespace sf {
namespace avx512vnni {
extern const I8Kernels i8 = kI8Kernels;
}  // namespace avx512vnni
}  // namespace sf
