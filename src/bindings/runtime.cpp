// Shared binding helpers (binding.h) and the runtime functions: kernel path, threads, and the
// mapping of sf::InvalidWeight to sparseforge.errors.ModelError.
#include <nanobind/stl/pair.h>

#include <stdexcept>

#include "binding.h"
#include "threadpool.h"

namespace sfb {

using namespace nb::literals;

void raise_config_error(const std::string& msg) {
  nb::object cls = nb::module_::import_("sparseforge.errors").attr("ConfigError");
  PyErr_SetString(cls.ptr(), msg.c_str());
  throw nb::python_error();
}

sf::Isa resolve(const std::string& isa) {
  try {
    return sf::resolve_isa(isa.c_str());
  } catch (const std::invalid_argument& e) {
    raise_config_error(e.what());
  }
}

int threads() {
  try {
    return sf::num_threads();
  } catch (const std::invalid_argument& e) {
    raise_config_error(e.what());
  }
}

int parse_algo(const std::string& algo) {
  if (algo == "auto") return 0;
  if (algo == "rows") return 1;
  if (algo == "lanes") return 2;
  throw std::invalid_argument("algo='" + algo + "' must be 'auto', 'rows' or 'lanes'");
}

namespace {

bool is_bf16(nb::dlpack::dtype d) {
  return d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && d.bits == 16 && d.lanes == 1;
}

sf::DType dtype_of(nb::dlpack::dtype d) {
  if (d == nb::dtype<float>()) return sf::DType::f32;
  if (is_bf16(d)) return sf::DType::bf16;
  if (d == nb::dtype<uint8_t>()) return sf::DType::u8;
  if (d == nb::dtype<int8_t>()) return sf::DType::i8;
  if (d == nb::dtype<uint16_t>()) return sf::DType::u16;
  if (d == nb::dtype<int16_t>()) return sf::DType::i16;
  if (d == nb::dtype<int32_t>()) return sf::DType::i32;
  if (d == nb::dtype<int64_t>()) return sf::DType::i64;
  return sf::DType::other;
}

template <class A>
void check_layout(const A& a, const char* name, size_t ndim) {
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
void check_float32(const A& a, const char* name) {
  if (a.dtype() != nb::dtype<float>()) {
    throw std::invalid_argument(std::string(name) + " must be float32, got " + sf::dtype_name(dtype_of(a.dtype())));
  }
}

}  // namespace

void check_array(const In& a, const char* name, size_t ndim) { check_layout(a, name, ndim); }
void check_out(const Out& a, const char* name, size_t ndim) { check_layout(a, name, ndim); }

void check_f32(const In& a, const char* name, size_t ndim) {
  check_layout(a, name, ndim);
  check_float32(a, name);
}

int64_t dim(const In& a, size_t d) { return static_cast<int64_t>(a.shape(d)); }

sf::Array array(const In& a, const char* name) {
  if (a.ndim() > 4) throw std::invalid_argument(std::string(name) + " must have at most 4 dimensions");
  check_layout(a, name, a.ndim());
  sf::Array out;
  out.data = a.data();
  out.ndim = static_cast<int>(a.ndim());
  for (size_t d = 0; d < a.ndim(); ++d) out.shape[d] = static_cast<int64_t>(a.shape(d));
  out.dtype = dtype_of(a.dtype());
  return out;
}

const float* bias_of(const nb::object& bias, int64_t out) {
  if (bias.is_none()) return nullptr;
  In b = nb::cast<In>(bias);
  check_f32(b, "bias", 1);
  if (dim(b, 0) != out) throw std::invalid_argument("bias must have shape (out_features,)");
  return static_cast<const float*>(b.data());
}

LinearOut linear_out(int64_t batch, const nb::object& bias, const Out& y) {
  check_out(y, "y", 2);
  check_float32(y, "y");
  LinearOut o;
  o.y = static_cast<float*>(y.data());
  o.out = static_cast<int64_t>(y.shape(1));
  if (static_cast<int64_t>(y.shape(0)) != batch) throw std::invalid_argument("y must have as many rows as x");
  o.bias = bias_of(bias, o.out);
  return o;
}

sf::Problem problem(const In& x, const nb::object& bias, const Out& y) {
  check_f32(x, "x", 2);
  return linear_problem<sf::Problem, float>(x, bias, y);
}

sf::ProblemT problem_t(const In& dy, const Out& dx) {
  check_f32(dy, "dy", 2);
  check_out(dx, "dx", 2);
  check_float32(dx, "dx");
  sf::ProblemT p;
  p.dy = static_cast<const float*>(dy.data());
  p.B = dim(dy, 0);
  p.out = dim(dy, 1);
  p.dx = static_cast<float*>(dx.data());
  p.in = static_cast<int64_t>(dx.shape(1));
  if (static_cast<int64_t>(dx.shape(0)) != p.B) throw std::invalid_argument("dx must have as many rows as dy");
  return p;
}

sf::ProblemW problem_w(const In& x, const In& dy, const Out& dw, size_t ndim, int64_t nnz) {
  check_f32(x, "x", 2);
  check_f32(dy, "dy", 2);
  check_out(dw, "dw", ndim);
  check_float32(dw, "dw");
  if (dim(x, 0) != dim(dy, 0)) throw std::invalid_argument("x and dy must have the same number of rows (batch)");
  if (static_cast<int64_t>(dw.size()) != nnz) {
    throw std::invalid_argument("dw must have one element per stored value (" + std::to_string(nnz) + "), got " +
                                std::to_string(dw.size()));
  }
  sf::ProblemW p;
  p.x = static_cast<const float*>(x.data());
  p.dy = static_cast<const float*>(dy.data());
  p.B = dim(x, 0);
  p.in = dim(x, 1);
  p.out = dim(dy, 1);
  p.dw = static_cast<float*>(dw.data());
  return p;
}

void register_runtime(nb::module_& m) {
  nb::register_exception_translator([](const std::exception_ptr& e, void*) {
    try {
      std::rethrow_exception(e);
    } catch (const sf::InvalidWeight& err) {
      nb::object cls = nb::module_::import_("sparseforge.errors").attr("ModelError");
      PyErr_SetString(cls.ptr(), err.what());
    }
  });
  m.def("isa", [](const std::string& requested) { return std::string(sf::isa_name(resolve(requested))); },
        "requested"_a = "", "Kernel path a call would use now: SPARSEFORGE_ISA if set, else the best this CPU has.");
  m.def("best_isa", [] { return std::string(sf::isa_name(sf::best_isa())); });
  m.def("cpu_supports", [](const std::string& name) {
    if (name == "scalar") return true;
    if (name == "avx2") return sf::compiled_with(sf::Isa::avx2) && sf::cpu_supports(sf::Isa::avx2);
    if (name == "avx512") return sf::compiled_with(sf::Isa::avx512) && sf::cpu_supports(sf::Isa::avx512);
    throw std::invalid_argument("unknown kernel path '" + name + "'");
  });
  m.def("num_threads", &threads, "Threads the kernels use (the caller included).");
  m.def("pool_wait_counts", [] {
    const sf::WaitCounts c = sf::wait_counts();
    return std::make_pair(c.spun, c.parked);
  }, "How the pool's workers began their waits so far: (polling first, sleeping at once).");
  m.def("pool_hold", [](bool on) {
    try {
      sf::hold(on);
    } catch (const std::logic_error& e) {
      raise_config_error(e.what());
    }
  }, "on: one more holder of the pool (its workers poll between jobs until released); off: one fewer.");
  m.def("pool_holders", &sf::holders, "How many holders the pool has now.");
  m.def("set_num_threads", [](int n) {
    try {
      sf::set_num_threads(n);
    } catch (const std::invalid_argument& e) {
      raise_config_error(e.what());
    }
  });
}

}  // namespace sfb
