// The AVX-512 bitmap kernels of bitmap_avx512.cpp compiled again with AVX512_VPOPCNTDQ (Ice Lake,
// Zen 4 and later): v512::decode16 then builds its vpermps indices with vpopcntd instead of a
// lookup table (batch-1 decode ~1.7x faster, see docs/kernels.md). kernels() in bitmap.cpp picks
// this table on CPUs that have the instructions (sf::use_vpopcntdq).
#define SF_AVX512_NS avx512vp
#include "bitmap_avx512.cpp"
