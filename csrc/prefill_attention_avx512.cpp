// Prefill-attention kernels compiled for AVX512 (the generic code of prefill_attention_kernels.h at this file's vector width).
#include "prefill_attention_kernels.h"

namespace sf {
namespace avx512 {
SF_DEFINE_PREFILL_ATTENTION_KERNELS
}  // namespace avx512
}  // namespace sf
