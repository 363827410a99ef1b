// Few-token expert FFN GEMV compiled for AVX2 (the generic code of expert_gemv_kernels.h at this file's vector width).
#include "expert_gemv_kernels.h"

namespace sf {
namespace avx2 {
extern const GemvColsFn gemv_cols = gemv_cols_impl;
}  // namespace avx2
}  // namespace sf
