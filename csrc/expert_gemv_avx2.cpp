// Few-token expert FFN GEMV compiled for AVX2 (the generic code of expert_gemv_kernels.h at this file's vector width).
#include "expert_gemv_kernels.h"

namespace sf {
namespace avx2 {
extern const GemvColsFn gemv_cols = gemv_cols_impl;
extern const RowDotsFn row_dots = row_dots_impl;
}  // namespace avx2
}  // namespace sf
