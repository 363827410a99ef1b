// Label-score kernels compiled for AVX2 (the generic code of label_select_kernels.h at this file's vector width).
#include "label_select_kernels.h"

namespace sf {
namespace avx2 {
SF_DEFINE_LABEL_SELECT_KERNELS
}  // namespace avx2
}  // namespace sf
