// Decode-layer glue compiled for AVX512 (the generic code of decode_glue_kernels.h at this file's vector width).
#include "decode_glue_kernels.h"

namespace sf {
namespace avx512 {
SF_DEFINE_GLUE_KERNELS
}  // namespace avx512
}  // namespace sf
