// Decode-attention chunk kernel compiled for AVX2 (the generic code of decode_attention_kernels.h at this file's vector width).
#include "decode_attention_kernels.h"

namespace sf {
namespace avx2 {
extern const AttnChunkFn attn_chunk_f32 = attn_chunk_impl<VT::f32>;
extern const AttnChunkFn attn_chunk_bf16 = attn_chunk_impl<VT::bf16>;
extern const PageScoreFn page_score_f32 = page_score_impl<VT::f32>;
extern const PageScoreFn page_score_bf16 = page_score_impl<VT::bf16>;
extern const SparseChunkFn sparse_chunk_f32 = sparse_chunk_impl<VT::f32>;
extern const SparseChunkFn sparse_chunk_bf16 = sparse_chunk_impl<VT::bf16>;
}  // namespace avx2
}  // namespace sf
