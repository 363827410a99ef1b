// sparseforge._native: the nanobind module over the torch-free kernels in csrc/.
//
// Each group of kernels is bound in its own file of src/bindings/ (shared helpers and the list of
// registration functions: src/bindings/binding.h); this file only assembles the module. To add a
// group: write src/bindings/<group>.cpp with `void register_<group>(nb::module_& m)`, declare it in
// binding.h, add the file to SF_BINDINGS in CMakeLists.txt and call it below.
#include "binding.h"

NB_MODULE(_native, m) {
  m.doc() = "sparseforge native CPU kernels (torch-free C++17; see docs/kernels.md)";
  sfb::register_runtime(m);
  sfb::register_sparse_linear(m);
  sfb::register_expert_ffn(m);
  sfb::register_activation(m);
  sfb::register_attention(m);
  sfb::register_linear_bf16(m);
  sfb::register_column_sparse(m);
  sfb::register_gemm_bf16x3(m);
  sfb::register_decode_glue(m);
}
