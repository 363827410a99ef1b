// int8-valued bitmap / N:M kernels compiled for AVX2 with AVX-VNNI (int8_kernels.h: the float32-activation
// kernels as in int8_avx2.cpp, and the I8Act::int8 kernels with vpdpbusd on ymm).
#include "int8_kernels.h"

namespace sf {
namespace avx2vnni {
extern const I8Kernels i8 = kI8Kernels;
}  // namespace avx2vnni
}  // namespace sf
