#include "isa.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace sf {

bool compiled_with(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  (void)isa;
  return true;
#else
  return isa == Isa::scalar;
#endif
}

bool cpu_supports(Isa isa) {
  if (isa == Isa::scalar) return true;
#if defined(SF_HAVE_X86_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register state (XCR0).
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  if (isa == Isa::avx2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

namespace {

// A run-time switch for a kernel build within a path: env `name` unset / "" / "auto" -> `cpu`; "0" -> false;
// "1" -> true, or std::invalid_argument naming `what` where the CPU lacks it.
bool kernel_build_switch(const char* name, bool cpu, const char* what) {
  const char* env = std::getenv(name);
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") return cpu;
  if (want == "0") return false;
  if (want == "1") {
    if (!cpu) throw std::invalid_argument(std::string(name) + "=1: this CPU (or build) lacks " + what + "; unset it or use 0");
    return true;
  }
  throw std::invalid_argument(std::string(name) + "='" + want + "' is not a setting; use auto, 0 or 1");
}

}  // namespace

bool use_vpopcntdq() {
#if defined(SF_HAVE_X86_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  static const bool cpu = [] {
    __builtin_cpu_init();
    return cpu_supports(Isa::avx512) && __builtin_cpu_supports("avx512vpopcntdq");
  }();
#else
  const bool cpu = false;
#endif
  return kernel_build_switch("SPARSEFORGE_VPOPCNTDQ", cpu, "AVX512_VPOPCNTDQ");
}

bool use_int8_vnni() {
#if defined(SF_HAVE_INT8_VNNI_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  static const bool cpu = [] {
    __builtin_cpu_init();
    return cpu_supports(Isa::avx512) && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512vbmi2");
  }();
#else
  const bool cpu = false;
#endif
  return kernel_build_switch("SPARSEFORGE_INT8_VNNI", cpu, "AVX512 VNNI / VBMI / VBMI2");
}

bool use_int8_avx_vnni() {
#if defined(SF_HAVE_INT8_AVX_VNNI_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  static const bool cpu = [] {
    __builtin_cpu_init();
    return cpu_supports(Isa::avx2) && __builtin_cpu_supports("avxvnni");
  }();
#else
  const bool cpu = false;
#endif
  return kernel_build_switch("SPARSEFORGE_INT8_VNNI", cpu, "AVX-VNNI");
}

bool use_avx512_vbmi2() {
#if defined(SF_HAVE_VBMI2_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  static const bool cpu = [] {
    __builtin_cpu_init();
    return cpu_supports(Isa::avx512) && __builtin_cpu_supports("avx512vbmi2");
  }();
#else
  const bool cpu = false;
#endif
  return kernel_build_switch("SPARSEFORGE_VBMI2", cpu, "AVX512_VBMI2");
}

bool use_avx512_bf16() {
#if defined(SF_HAVE_BF16_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  static const bool cpu = [] {
    __builtin_cpu_init();
    return cpu_supports(Isa::avx512) && __builtin_cpu_supports("avx512bf16");
  }();
#else
  const bool cpu = false;
#endif
  return kernel_build_switch("SPARSEFORGE_AVX512_BF16", cpu, "AVX512_BF16");
}

Isa best_isa() {
  if (compiled_with(Isa::avx512) && cpu_supports(Isa::avx512)) return Isa::avx512;
  if (compiled_with(Isa::avx2) && cpu_supports(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "?";
}

Isa resolve_isa(const char* requested) {
  std::string want = requested ? requested : "";
  std::string source = "isa argument";
  if (want.empty()) {
    const char* env = std::getenv("SPARSEFORGE_ISA");
    want = env ? env : "";
    source = "SPARSEFORGE_ISA";
  }
  if (want.empty() || want == "auto") return best_isa();
  Isa isa;
  if (want == "scalar") {
    isa = Isa::scalar;
  } else if (want == "avx2") {
    isa = Isa::avx2;
  } else if (want == "avx512") {
    isa = Isa::avx512;
  } else {
    throw std::invalid_argument(source + "='" + want +
                                "' is not a kernel path; use one of auto, scalar, avx2, avx512");
  }
  if (!compiled_with(isa)) {
    throw std::invalid_argument(source + "=" + want +
                                ": this build has no such path (not an x86-64 build); use scalar or auto");
  }
  if (!cpu_supports(isa)) {
    throw std::invalid_argument(source + "=" + want + ": this CPU lacks the instructions (" +
                                (isa == Isa::avx2 ? std::string("AVX2, FMA, BMI2")
                                                  : std::string("AVX-512 F/BW/VL/DQ")) +
                                "); best available is " + isa_name(best_isa()) +
                                ", or unset the variable for auto");
  }
  return isa;
}

}  // namespace sf
