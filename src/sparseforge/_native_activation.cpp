// sparseforge._native, activation-sparsity part: a thin nanobind layer over csrc/sparse_input.h.
//
// register_activation(mod) adds, on the module built in _native.cpp:
//   sparse_input_linear(x, w, thr, bias, y, isa="", algo="auto", parallel=True)
//   sparse_input_linear_ref(x, w, thr, bias, y)        the scalar oracle
//   sparse_input_count(x, thr, counts)                 active channels per row, int64 (B,)
// x (B, in) float32, w (in, out) float32 or bfloat16 (or its raw uint16 bits), thr (1,) or (in,)
// float32, bias (out,) float32 or None, y (B, out) float32 written in place; all CPU, C-contiguous.
// The kernels run with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <stdexcept>
#include <string>

#include "isa.h"
#include "sparse_input.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using In = nb::ndarray<nb::ro>;
using Out = nb::ndarray<>;

[[noreturn]] void config_error(const std::string& msg) {
  nb::object cls = nb::module_::import_("sparseforge.errors").attr("ConfigError");
  PyErr_SetString(cls.ptr(), msg.c_str());
  throw nb::python_error();
}

template <class A>
void check_plain(const A& a, const char* name, size_t ndim) {
  if (a.device_type() != nb::device::cpu::value) throw std::invalid_argument(std::string(name) + " must be on the CPU");
  if (a.ndim() != ndim) {
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(ndim) + " dimension(s), got " +
                                std::to_string(a.ndim()));
  }
  for (size_t d = 0; d < ndim; ++d)
    if (a.shape(d) == 0) return;  // empty: nothing is read or written
  int64_t expect = 1;
  for (size_t d = ndim; d-- > 0;) {
    if (a.shape(d) > 1 && a.stride(d) != expect) {
      throw std::invalid_argument(std::string(name) + " must be C-contiguous (call .contiguous() first)");
    }
    expect *= static_cast<int64_t>(a.shape(d));
  }
}

template <class A>
void check_f32(const A& a, const char* name, size_t ndim) {
  check_plain(a, name, ndim);
  if (a.dtype() != nb::dtype<float>()) throw std::invalid_argument(std::string(name) + " must be float32");
}

int64_t dim(const In& a, size_t d) { return static_cast<int64_t>(a.shape(d)); }

// x, thr (and bias) checked and set on p; in from x
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
  sf::SparseInputProblem p = input_problem(x, thr);
  check_plain(w, "weight", 2);
  if (w.dtype() == nb::dtype<float>()) {
    p.wt = sf::VT::f32;
  } else if (w.dtype() == nb::dtype<uint16_t>() ||
             (w.dtype().code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && w.dtype().bits == 16)) {
    p.wt = sf::VT::bf16;
  } else {
    throw std::invalid_argument("weight must be float32 or bfloat16");
  }
  if (dim(w, 0) != p.in) {
    throw std::invalid_argument("weight must be input-channel-major (in_features, out_features) with in_features = " +
                                std::to_string(p.in) + ", got " + std::to_string(dim(w, 0)) + " rows");
  }
  p.w = w.data();
  p.out = dim(w, 1);
  check_f32(y, "y", 2);
  if (static_cast<int64_t>(y.shape(0)) != p.B || static_cast<int64_t>(y.shape(1)) != p.out) {
    throw std::invalid_argument("y must have shape (batch, out_features)");
  }
  p.y = static_cast<float*>(y.data());
  if (!bias.is_none()) {
    In b = nb::cast<In>(bias);
    check_f32(b, "bias", 1);
    if (dim(b, 0) != p.out) throw std::invalid_argument("bias must have shape (out_features,)");
    p.bias = static_cast<const float*>(b.data());
  }
  return p;
}

int parse_algo(const std::string& algo) {
  if (algo == "auto") return 0;
  if (algo == "gemv") return 1;
  if (algo == "gemm") return 2;
  throw std::invalid_argument("algo='" + algo + "' must be 'auto', 'gemv' or 'gemm'");
}

}  // namespace

void register_activation(nb::module_& mod) {
  mod.def(
      "sparse_input_linear",
      [](const In& x, const In& w, const In& thr, const nb::object& bias, const Out& y, const std::string& isa,
         const std::string& algo, bool parallel) {
        const sf::SparseInputProblem p = linear_problem(x, w, thr, bias, y);
        const int a = parse_algo(algo);
        sf::Isa i;
        try {
          i = sf::resolve_isa(isa.c_str());
          sf::num_threads();  // a bad SPARSEFORGE_NUM_THREADS is a ConfigError here, not inside the kernel
        } catch (const std::invalid_argument& e) {
          config_error(e.what());
        }
        nb::gil_scoped_release rel;
        sf::sparse_input_linear(p, i, a, parallel);
      },
      "x"_a, "w"_a, "thresholds"_a, "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto", "parallel"_a = true,
      "y (B, out) = (x with channels |x| <= threshold skipped) @ w (in, out) + bias; see csrc/sparse_input.h.");
  mod.def(
      "sparse_input_linear_ref",
      [](const In& x, const In& w, const In& thr, const nb::object& bias, const Out& y) {
        const sf::SparseInputProblem p = linear_problem(x, w, thr, bias, y);
        nb::gil_scoped_release rel;
        sf::sparse_input_linear_ref(p);
      },
      "x"_a, "w"_a, "thresholds"_a, "bias"_a.none(), "y"_a, "Scalar reference of sparse_input_linear (test oracle).");
  mod.def(
      "sparse_input_count",
      [](const In& x, const In& thr, const Out& counts) {
        const sf::SparseInputProblem p = input_problem(x, thr);
        check_plain(counts, "counts", 1);
        if (counts.dtype() != nb::dtype<int64_t>() || static_cast<int64_t>(counts.shape(0)) != p.B) {
          throw std::invalid_argument("counts must be int64 of shape (batch,)");
        }
        nb::gil_scoped_release rel;
        sf::sparse_input_count(p, static_cast<int64_t*>(counts.data()));
      },
      "x"_a, "thresholds"_a, "counts"_a, "Active (not skipped) input channels per row of x.");
}
