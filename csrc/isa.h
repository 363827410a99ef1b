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

}  // namespace sf
