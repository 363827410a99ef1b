// Decode-attention kernels compiled for AVX512 (the generic code of decode_attention_kernels.h at this file's vector width).
#include "decode_attention_kernels.h"

namespace sf {
namespace avx512 {
SF_DEFINE_DECODE_ATTENTION_KERNELS
}  // namespace avx512
}  // namespace sf
