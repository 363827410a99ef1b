// The AVX-512 nm kernels of nm_avx512.cpp compiled again with AVX512_VPOPCNTDQ (Ice Lake,
// Zen 4 and later): v512::decode16 then builds its vpermps indices with vpopcntd instead of a
// lookup table (batch-1 decode ~1.7x faster, see docs/kernels.md). kernels() in nm.cpp picks
// this table on CPUs that have the instructions (sf::use_vpopcntdq).
#define SF_AVX512_NS avx512vp
#include "nm_avx512.cpp"
