// Bindings of the bf16 panel product (csrc/linear_bf16.h):
//   <fmt>_linear_bf16(x, W..., bias, y, path, check_indices, method)   y = bf16(x) @ bf16(W)^T + bias;
//                                                 method "panel" (the dense-panel product on `path`) or "skip"
//                                                 (the zero-skipping lanes walk on SPARSEFORGE_ISA / the best ISA)
//   <fmt>_linear_bf16_ref(...)                                 the scalar oracle (path ignored)
//   bf16_path(requested), bf16_best_path(), bf16_path_supported(name)
// for fmt in bitmap, nm, csr. x is bf16 as raw uint16 bits (B, in) or float32 (rounded to bf16 as it is read); y float32 (B, out); W... as in
// sparse_linear.cpp. A path the CPU lacks (or an unknown one) raises ConfigError.
// And the dense bf16 GEMV (csrc/dense_bf16.h):
//   dense_bf16_gemv(x, w, bias, y, isa) -> kernel name   y = x @ w^T + bias; x (B, in), w (out, in) bf16
//                                                         bits, bias float32 (out,) or None, y (B, out)
//                                                         float32 or bf16 bits
//   dense_bf16_gemv_ref(x, w, bias, y)                    the scalar oracle
//   dense_bf16_kernel(isa) -> kernel name a call would run
#include <stdexcept>
#include <string>

#include "binding.h"
#include "dense_bf16.h"
#include "linear_bf16.h"
#include "views.h"

namespace sfb {

using namespace nb::literals;

sf::Bf16Path resolve_bf16(const std::string& path) {
  try {
    return sf::resolve_bf16_path(path.c_str());
  } catch (const std::invalid_argument& e) {
    raise_config_error(e.what());
  }
}

namespace {

// x (B, in) bf16 bits or float32 (rounded to bf16 by the kernel), bias (out,) float32 or None, y (B, out) float32
sf::Bf16Problem problem_bf16(const In& x, const nb::object& bias, const Out& y) {
  check_array(x, "x", 2);
  if (x.dtype() == nb::dtype<float>()) {
    sf::Bf16Problem p = linear_problem<sf::Bf16Problem, uint16_t>(x, bias, y);
    p.xf = static_cast<const float*>(x.data());
    p.x = nullptr;
    return p;
  }
  if (x.dtype() != nb::dtype<uint16_t>())
    throw std::invalid_argument("x must be bfloat16 (its raw uint16 bits) or float32 (rounded to bfloat16)");
  return linear_problem<sf::Bf16Problem, uint16_t>(x, bias, y);
}

template <class View>
struct Bf16Fns {
  void (*panel)(const View&, const sf::Bf16Problem&, sf::Bf16Path);
  void (*skip)(const View&, const sf::Bf16Problem&, sf::Isa);
  void (*oracle)(const View&, const sf::Bf16Problem&);
};

template <class View>
void call(const View& w, const sf::Bf16Problem& p, const std::string& path, bool ref, const std::string& method,
          const Bf16Fns<View>& fns) {
  if (w.rows != p.out) throw std::invalid_argument("y must have one column per weight row");
  if (method != "panel" && method != "skip")
    raise_config_error("bf16 method '" + method + "' is unknown; use panel (dense panels, AMX) or skip (zero-skipping walk)");
  if (ref) {
    nb::gil_scoped_release rel;
    fns.oracle(w, p);
  } else if (method == "skip") {
    if (w.vt != sf::VT::bf16)
      raise_config_error("bf16 method 'skip' needs bfloat16 values; store the weight with bfloat16 values or use method 'panel'");
    const sf::Isa isa = resolve("");
    nb::gil_scoped_release rel;
    fns.skip(w, p, isa);
  } else {
    const sf::Bf16Path path_ = resolve_bf16(path);
    nb::gil_scoped_release rel;
    fns.panel(w, p, path_);
  }
}

// x (B, in) and w (out, in) bf16 bits, bias (out,) float32 or None, y (B, out) float32 or bf16 bits
sf::DenseBf16Problem problem_dense(const In& x, const In& w, const nb::object& bias, const Out& y) {
  check_array(x, "x", 2);
  check_array(w, "w", 2);
  check_out(y, "y", 2);
  if (x.dtype() != nb::dtype<uint16_t>() || w.dtype() != nb::dtype<uint16_t>())
    throw std::invalid_argument("x and w must be bfloat16 (their raw uint16 bits)");
  sf::DenseBf16Problem p;
  p.x = static_cast<const uint16_t*>(x.data());
  p.B = dim(x, 0);
  p.in = dim(x, 1);
  p.w = static_cast<const uint16_t*>(w.data());
  p.out = dim(w, 0);
  if (dim(w, 1) != p.in) throw std::invalid_argument("w must have as many columns as x");
  if (static_cast<int64_t>(y.shape(0)) != p.B || static_cast<int64_t>(y.shape(1)) != p.out)
    throw std::invalid_argument("y must have shape (x rows, w rows)");
  if (y.dtype() == nb::dtype<float>()) p.y32 = static_cast<float*>(y.data());
  else if (y.dtype() == nb::dtype<uint16_t>()) p.y16 = static_cast<uint16_t*>(y.data());
  else throw std::invalid_argument("y must be float32 or bfloat16 (its raw uint16 bits)");
  p.bias = bias_of(bias, p.out);
  return p;
}

}  // namespace

void register_linear_bf16(nb::module_& m) {
  m.def("bf16_path", [](const std::string& requested) { return std::string(sf::bf16_path_name(resolve_bf16(requested))); },
        "requested"_a = "", "bf16 kernel path a call would use now (SPARSEFORGE_BF16_PATH, else the best).");
  m.def("bf16_best_path", [] { return std::string(sf::bf16_path_name(sf::best_bf16_path())); });
  m.def("bf16_path_supported", [](const std::string& name) {
    for (const sf::Bf16Path p : {sf::Bf16Path::scalar, sf::Bf16Path::avx512_bf16, sf::Bf16Path::amx})
      if (name == sf::bf16_path_name(p)) return sf::bf16_path_supported(p);
    raise_config_error("unknown bf16 kernel path '" + name + "'; use scalar, avx512_bf16 or amx");
  }, "name"_a);
  for (const bool ref : {false, true}) {
    const std::string sfx = ref ? "_ref" : "";
    const std::string bm = "bitmap_linear_bf16" + sfx, nm = "nm_linear_bf16" + sfx, cs = "csr_linear_bf16" + sfx;
    m.def(bm.c_str(),
          [ref, bm](const In& x, const In& bits, const In& row_offsets, const In& values, const nb::object& bias,
                    const Out& y, const std::string& path, bool check_indices, const std::string& method) {
            const sf::Bf16Problem p = problem_bf16(x, bias, y);
            call(sf::bitmap_view(array(bits, "bitmap"), array(row_offsets, "row_offsets"), array(values, "values"), p.in,
                                 bm.c_str(), check_indices),
                 p, path, ref, method, {sf::bitmap_linear_bf16, sf::bitmap_linear_bf16_skip, sf::bitmap_linear_bf16_ref});
          },
          "x"_a, "bitmap"_a, "row_offsets"_a, "values"_a, "bias"_a.none(), "y"_a, "path"_a = "", "check_indices"_a = true,
          "method"_a = "panel");
    m.def(nm.c_str(),
          [ref, nm](const In& x, const In& values, const In& indices, int n, int mm, const nb::object& bias, const Out& y,
                    const std::string& path, bool check_indices, const std::string& method) {
            const sf::Bf16Problem p = problem_bf16(x, bias, y);
            call(sf::nm_view(array(values, "values"), array(indices, "indices"), n, mm, p.in, nm.c_str(), check_indices), p,
                 path, ref, method, {sf::nm_linear_bf16, sf::nm_linear_bf16_skip, sf::nm_linear_bf16_ref});
          },
          "x"_a, "values"_a, "indices"_a, "n"_a, "m"_a, "bias"_a.none(), "y"_a, "path"_a = "", "check_indices"_a = true,
          "method"_a = "panel");
    m.def(cs.c_str(),
          [ref, cs](const In& x, const In& row_ptr, const In& col, const In& values, const nb::object& bias,
                    const Out& y, const std::string& path, bool check_indices, const std::string& method) {
            const sf::Bf16Problem p = problem_bf16(x, bias, y);
            call(sf::csr_view(array(row_ptr, "row_ptr"), array(col, "col"), array(values, "values"), p.in, cs.c_str(),
                              check_indices),
                 p, path, ref, method, {sf::csr_linear_bf16, sf::csr_linear_bf16_skip, sf::csr_linear_bf16_ref});
          },
          "x"_a, "row_ptr"_a, "col"_a, "values"_a, "bias"_a.none(), "y"_a, "path"_a = "", "check_indices"_a = true,
          "method"_a = "panel");
  }
  m.def("dense_bf16_gemv", [](const In& x, const In& w, const nb::object& bias, const Out& y, const std::string& isa) {
    const sf::DenseBf16Problem p = problem_dense(x, w, bias, y);
    const sf::Isa isa_ = resolve(isa);
    nb::gil_scoped_release rel;
    return std::string(sf::dense_bf16_gemv(p, isa_));
  }, "x"_a, "w"_a, "bias"_a.none(), "y"_a, "isa"_a = "");
  m.def("dense_bf16_gemv_ref", [](const In& x, const In& w, const nb::object& bias, const Out& y) {
    const sf::DenseBf16Problem p = problem_dense(x, w, bias, y);
    nb::gil_scoped_release rel;
    sf::dense_bf16_gemv_ref(p);
  }, "x"_a, "w"_a, "bias"_a.none(), "y"_a);
  m.def("dense_bf16_kernel", [](const std::string& isa) { return std::string(sf::dense_bf16_kernel_name(resolve(isa))); },
        "isa"_a = "", "dense bf16 GEMV kernel a call would run now (SPARSEFORGE_ISA, SPARSEFORGE_AVX512_BF16).");
}

}  // namespace sfb
