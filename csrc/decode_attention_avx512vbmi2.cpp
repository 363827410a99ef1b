// The compressed-KV chunk kernel for bfloat16 compiled for AVX-512 with AVX512_VBMI2 (picked by
// decode_attention.cpp where use_avx512_vbmi2()): the code of decode_attention_kernels.h, whose direct
// path then expands 32 kept bfloat16 channels per vpexpandw (word order).
#include "decode_attention_kernels.h"

namespace sf {
namespace avx512vbmi2 {
extern const SparseChunkFn sparse_chunk_bf16 = sparse_chunk_impl<VT::bf16>;
}  // namespace avx512vbmi2
}  // namespace sf
