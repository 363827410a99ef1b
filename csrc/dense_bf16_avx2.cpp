// Dense bf16 GEMV compiled for AVX2 (the widening kernel of dense_bf16_kernels.h at this file's vector width).
#include "dense_bf16_kernels.h"

namespace sf {
namespace avx2 {
extern const DenseBf16DotsFn dense_bf16_dots = dense_bf16_dots_impl;
}  // namespace avx2
}  // namespace sf
