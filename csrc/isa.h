// Run-time choice of the instruction-set path.
//
// SPARSEFORGE_ISA=scalar|avx2|avx512 forces a path (an error if this CPU lacks it); unset, empty
// or "auto" picks the best path the CPU supports. The variable is read on every call, so a
// process (or a test) can switch paths by changing it.
#pragma once

#include <string>

#include "common.h"

namespace sf {

bool cpu_supports(Isa isa);       // CPU (and OS register state) can run this path
bool compiled_with(Isa isa);      // this build contains the path (x86-64 builds contain all)
Isa best_isa();                   // best path this CPU supports
Isa resolve_isa(const char* requested);  // nullptr/"" -> SPARSEFORGE_ISA -> best; throws std::invalid_argument
const char* isa_name(Isa isa);
// Within the avx512 path: use the kernels built with AVX512_VPOPCNTDQ (Ice Lake, Zen 4 and later;
// the bitmap and N:M decoders build their vpermps indices with vpopcntd instead of a lookup
// table). True when the CPU has it, unless SPARSEFORGE_VPOPCNTDQ=0 (tests use that to run the
// table path on such CPUs); SPARSEFORGE_VPOPCNTDQ=1 on a CPU without it throws.
bool use_vpopcntdq();
// Within the avx512 path: use the int8 kernels built with AVX512 VNNI, VBMI and VBMI2 (Ice Lake,
// Sapphire Rapids, Zen 4 and later) for int8 activations (csrc/int8.h, I8Act::int8). True when the
// CPU has all three and the build has the kernels, unless SPARSEFORGE_INT8_VNNI=0 (tests use that to
// run the portable integer path); SPARSEFORGE_INT8_VNNI=1 where they are missing throws.
bool use_int8_vnni();
// Within the avx2 path: use the int8 kernels built with AVX-VNNI (vpdpbusd on ymm) for int8 activations.
// True when the CPU has AVX-VNNI and the build has the kernels; the same SPARSEFORGE_INT8_VNNI switch
// (0: the AVX2 vpmaddubsw kernels; 1 where they are missing throws).
bool use_int8_avx_vnni();

// Within the avx512 path: the column-sparse GEMV built with AVX512_VBMI2 (column_sparse.h: its bfloat16
// values expanded 32 at a time by vpexpandw). True when the CPU has it and the build has the kernels,
// unless SPARSEFORGE_VBMI2=0 (tests use that to run the plain AVX-512 walk); SPARSEFORGE_VBMI2=1 where
// they are missing throws.
bool use_avx512_vbmi2();

// Within the avx512 path: the dense bf16 GEMV (dense_bf16.h) multiplies with vdpbf16ps. True when the CPU
// has AVX512_BF16 and the build has the kernel, unless SPARSEFORGE_AVX512_BF16=0 (the widening kernel);
// SPARSEFORGE_AVX512_BF16=1 where it is missing throws.
bool use_avx512_bf16();

}  // namespace sf
