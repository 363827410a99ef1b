// Few-token expert FFN GEMV compiled for AVX512 (the generic code of expert_gemv_kernels.h at this file's vector width).
#include "expert_gemv_kernels.h"

namespace sf {
namespace avx512 {
extern const GemvColsFn gemv_cols = gemv_cols_impl;
extern const RowDotsFn row_dots = row_dots_impl;
}  // namespace avx512
}  // namespace sf
