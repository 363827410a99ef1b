// Label-score kernels compiled for AVX512 (the generic code of label_select_kernels.h at this file's vector width).
#include "label_select_kernels.h"

namespace sf {
namespace avx512 {
SF_DEFINE_LABEL_SELECT_KERNELS
}  // namespace avx512
}  // namespace sf
