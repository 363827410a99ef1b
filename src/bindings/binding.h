// Shared pieces of the nanobind layer (sparseforge._native) over the torch-free kernels in csrc/.
//
// The module is assembled in src/sparseforge/_native.cpp from registration functions, one per
// binding file of this folder (declared at the end): a new group of kernels adds a .cpp file here
// with its `void register_xxx(nb::module_& m)`, declares it below, lists the file in CMakeLists.txt
// (SF_BINDINGS) and calls it from NB_MODULE.
//
// Arrays come in as any DLPack / buffer-protocol object (numpy arrays, torch tensors), are checked
// (CPU, C-contiguous, dtype, shape) and handed to the kernels as raw pointers with the GIL released.
// Outputs are written in place into caller-allocated float32 arrays. Weight buffers that a kernel
// cannot read safely raise sparseforge.errors.ModelError (sf::InvalidWeight, see csrc/buffers.h);
// other bad arguments raise ValueError, bad settings ConfigError.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <string>

#include "buffers.h"
#include "common.h"
#include "isa.h"
#include "linear_bf16.h"

namespace sf {
enum class Bf16Path : int;  // csrc/linear_bf16.h
}  // namespace sf

namespace sfb {

namespace nb = nanobind;

using In = nb::ndarray<nb::ro>;
using Out = nb::ndarray<>;

[[noreturn]] void raise_config_error(const std::string& msg);
sf::Isa resolve(const std::string& isa);  // "" -> SPARSEFORGE_ISA -> best; ConfigError if unusable
// "" -> SPARSEFORGE_BF16_PATH -> best (csrc/linear_bf16.h); ConfigError if unknown or unusable
sf::Bf16Path resolve_bf16(const std::string& path);
int threads();                             // kernel threads; ConfigError for a bad SPARSEFORGE_NUM_THREADS
int parse_algo(const std::string& algo);   // "auto" 0, "rows" 1, "lanes" 2

// a: on the CPU, `ndim` dimensions, C-contiguous (ValueError naming `name` otherwise)
void check_array(const In& a, const char* name, size_t ndim);
void check_out(const Out& a, const char* name, size_t ndim);
void check_f32(const In& a, const char* name, size_t ndim);  // check_array + float32
int64_t dim(const In& a, size_t d);
// a weight buffer as the view builders take it (csrc/views.h): on the CPU and C-contiguous
sf::Array array(const In& a, const char* name);

// y (batch, out) float32 and bias (out,) float32 or None, checked
struct LinearOut {
  float* y = nullptr;
  int64_t out = 0;
  const float* bias = nullptr;
};
// bias: None (nullptr) or a float32 (out,) array, checked
const float* bias_of(const nb::object& bias, int64_t out);
LinearOut linear_out(int64_t batch, const nb::object& bias, const Out& y);
// P (sf::Problem, sf::Bf16Problem) over x (B, in) of element type T (checked by the caller), y and bias
template <class P, class T>
P linear_problem(const In& x, const nb::object& bias, const Out& y) {
  P p;
  p.x = static_cast<const T*>(x.data());
  p.B = dim(x, 0);
  p.in = dim(x, 1);
  const LinearOut o = linear_out(p.B, bias, y);
  p.y = o.y;
  p.out = o.out;
  p.bias = o.bias;
  return p;
}
// x (B, in) float32, bias (out,) float32 or None, y (B, out) float32
sf::Problem problem(const In& x, const nb::object& bias, const Out& y);
// dy (B, out), dx (B, in), float32
sf::ProblemT problem_t(const In& dy, const Out& dx);
// x (B, in), dy (B, out), dw float32 with `nnz` elements in any C-contiguous shape of `ndim` dims
sf::ProblemW problem_w(const In& x, const In& dy, const Out& dw, size_t ndim, int64_t nnz);

// Registration functions, one per binding file.
void register_runtime(nb::module_& m);        // runtime.cpp: kernel path, threads, error mapping
void register_sparse_linear(nb::module_& m);  // sparse_linear.cpp: CSR, bitmap, N:M, fan-in, BSR
void register_expert_ffn(nb::module_& m);     // expert_ffn.cpp: few-token MoE expert FFN
void register_activation(nb::module_& m);     // activation.cpp: sparse-input linear (activation sparsity)
void register_attention(nb::module_& m);      // attention.cpp: decode attention, Quest page selection, sparse KV
void register_linear_bf16(nb::module_& m);    // linear_bf16.cpp: bf16 / AMX panel product (batch >= 16)
void register_column_sparse(nb::module_& m);  // column_sparse.cpp: activation x weight sparse linear
void register_gemm_bf16x3(nb::module_& m);    // gemm_bf16x3.cpp: float32-accurate GEMM from three bf16 products (AMX)
void register_decode_glue(nb::module_& m);    // decode_glue.cpp: RMSNorm, SwiGLU and rotary + KV write of a decode step

}  // namespace sfb
