// Prefill-attention kernels compiled for AVX2 (the generic code of prefill_attention_kernels.h at this file's vector width).
#include "prefill_attention_kernels.h"

namespace sf {
namespace avx2 {
SF_DEFINE_PREFILL_ATTENTION_KERNELS
}  // namespace avx2
}  // namespace sf
