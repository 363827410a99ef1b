// Binding of the sparse-input linear layer (csrc/sparse_input.h, activation sparsity):
//   sparse_input_linear(x, w, thresholds, bias, y, isa="", algo="auto", parallel=True)
//   sparse_input_linear_ref(x, w, thresholds, bias, y)     the scalar oracle
//   sparse_input_count(x, thresholds, counts)              active channels per row, int64 (B,)
// x (B, in) float32, w (in, out) float32 or bfloat16 (or its raw uint16 bits), thresholds (1,) or
// (in,) float32, bias (out,) float32 or None, y (B, out) float32 written in place.
#include <stdexcept>
#include <string>

#include "binding.h"
#include "sparse_input.h"

namespace sfb {

using namespace nb::literals;

namespace {

// x and thresholds checked and set on p; in from x
sf::SparseInputProblem input_problem(const In& x, const In& thr) {
  check_f32(x, "x", 2);
  check_f32(thr, "thresholds", 1);
  sf::SparseInputProblem p;
  p.x = static_cast<const float*>(x.data());
  p.B = dim(x, 0);
  p.in = dim(x, 1);
  if (dim(thr, 0) != 1 && dim(thr, 0) != p.in) {
    throw std::invalid_argument("thresholds must have 1 or in_features (" + std::to_string(p.in) + ") entries, got " +
                                std::to_string(dim(thr, 0)));
  }
  p.thr = static_cast<const float*>(thr.data());
  p.thr_per_channel = dim(thr, 0) == p.in && p.in != 1;
  return p;
}

sf::SparseInputProblem linear_problem(const In& x, const In& w, const In& thr, const nb::object& bias, const Out& y) {
  const sf::Problem d = problem(x, bias, y);  // x (B, in), y (B, out), bias (out,) or None
  sf::SparseInputProblem p = input_problem(x, thr);
  check_array(w, "weight", 2);
  if (w.dtype() == nb::dtype<float>()) {
    p.wt = sf::VT::f32;
  } else if (w.dtype() == nb::dtype<uint16_t>() ||
             (w.dtype().code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && w.dtype().bits == 16)) {
    p.wt = sf::VT::bf16;
  } else {
    throw std::invalid_argument("weight must be float32 or bfloat16");
  }
  if (dim(w, 0) != p.in || dim(w, 1) != d.out) {
    throw std::invalid_argument("weight must be input-channel-major (in_features, out_features) = (" +
                                std::to_string(p.in) + ", " + std::to_string(d.out) + "), got (" +
                                std::to_string(dim(w, 0)) + ", " + std::to_string(dim(w, 1)) + ")");
  }
  p.w = w.data();
  p.out = d.out;
  p.y = d.y;
  p.bias = d.bias;
  return p;
}

int parse_si_algo(const std::string& algo) {
  if (algo == "auto") return 0;
  if (algo == "gemv") return 1;
  if (algo == "gemm") return 2;
  throw std::invalid_argument("algo='" + algo + "' must be 'auto', 'gemv' or 'gemm'");
}

}  // namespace

void register_activation(nb::module_& m) {
  m.def(
      "sparse_input_linear",
      [](const In& x, const In& w, const In& thr, const nb::object& bias, const Out& y, const std::string& isa,
         const std::string& algo, bool parallel) {
        const sf::SparseInputProblem p = linear_problem(x, w, thr, bias, y);
        const int a = parse_si_algo(algo);
        const sf::Isa i = resolve(isa);
        threads();  // a bad SPARSEFORGE_NUM_THREADS is a ConfigError here, not inside the kernel
        nb::gil_scoped_release rel;
        sf::sparse_input_linear(p, i, a, parallel);
      },
      "x"_a, "w"_a, "thresholds"_a, "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto", "parallel"_a = true,
      "y (B, out) = (x with channels |x| <= threshold skipped) @ w (in, out) + bias; see csrc/sparse_input.h.");
  m.def(
      "sparse_input_linear_ref",
      [](const In& x, const In& w, const In& thr, const nb::object& bias, const Out& y) {
        const sf::SparseInputProblem p = linear_problem(x, w, thr, bias, y);
        nb::gil_scoped_release rel;
        sf::sparse_input_linear_ref(p);
      },
      "x"_a, "w"_a, "thresholds"_a, "bias"_a.none(), "y"_a, "Scalar reference of sparse_input_linear (test oracle).");
  m.def(
      "sparse_input_count",
      [](const In& x, const In& thr, const Out& counts) {
        const sf::SparseInputProblem p = input_problem(x, thr);
        check_out(counts, "counts", 1);
        if (counts.dtype() != nb::dtype<int64_t>() || static_cast<int64_t>(counts.shape(0)) != p.B) {
          throw std::invalid_argument("counts must be int64 of shape (batch,)");
        }
        nb::gil_scoped_release rel;
        sf::sparse_input_count(p, static_cast<int64_t*>(counts.data()));
      },
      "x"_a, "thresholds"_a, "counts"_a, "Active (not skipped) input channels per row of x.");
}

}  // namespace sfb
