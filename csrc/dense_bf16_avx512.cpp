// Dense bf16 GEMV compiled for AVX-512F (the widening kernel of dense_bf16_kernels.h at this file's vector width).
#include "dense_bf16_kernels.h"

namespace sf {
namespace avx512 {
extern const DenseBf16DotsFn dense_bf16_dots = dense_bf16_dots_impl;
}  // namespace avx512
}  // namespace sf
