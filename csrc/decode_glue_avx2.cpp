// Decode-layer glue compiled for AVX2 (the generic code of decode_glue_kernels.h at this file's vector width).
#include "decode_glue_kernels.h"

namespace sf {
namespace avx2 {
SF_DEFINE_GLUE_KERNELS
}  // namespace avx2
}  // namespace sf
