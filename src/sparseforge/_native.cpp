// sparseforge._native: a thin nanobind layer over the torch-free kernels in csrc/.
//
// Arrays come in as any DLPack / buffer-protocol object (numpy arrays, torch tensors), are
// checked (CPU, C-contiguous, dtype, shape) and handed to the kernels as raw pointers with the
// GIL released. Outputs are written in place into a caller-allocated float32 array. Format
// invariants that cost a pass over the weights (column indices < cols, bitmap popcounts matching
// row_offsets, ...) are checked once by the Python format classes, not on every call.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <stdexcept>
#include <string>

#include "bitmap.h"
#include "bsr.h"
#include "csr.h"
#include "expert_gemv.h"
#include "fanin.h"
#include "isa.h"
#include "nm.h"
#include "threadpool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using In = nb::ndarray<nb::ro>;
using Out = nb::ndarray<>;

[[noreturn]] void raise_config_error(const std::string& msg) {
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

std::string dtype_name(nb::dlpack::dtype d) {
  const char* kind = "?";
  switch (static_cast<nb::dlpack::dtype_code>(d.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    default: kind = "other"; break;
  }
  return std::string(kind) + std::to_string(d.bits);
}

bool is_bf16(nb::dlpack::dtype d) {
  return d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && d.bits == 16 && d.lanes == 1;
}

template <class A>
void check_array(const A& a, const char* name, size_t ndim) {
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
void check_dtype(const A& a, const char* name, nb::dlpack::dtype want, const char* want_name) {
  if (a.dtype() != want) {
    throw std::invalid_argument(std::string(name) + " must be " + want_name + ", got " + dtype_name(a.dtype()));
  }
}

sf::VT value_type(const In& v, const char* name) {
  if (v.dtype() == nb::dtype<float>()) return sf::VT::f32;
  if (is_bf16(v.dtype()) || v.dtype() == nb::dtype<uint16_t>()) return sf::VT::bf16;  // uint16: raw bf16 bits
  throw std::invalid_argument(std::string(name) + " must be float32 or bfloat16, got " + dtype_name(v.dtype()));
}

int64_t dim(const In& a, size_t d) { return static_cast<int64_t>(a.shape(d)); }

// x (B, in) float32, bias (out,) float32 or None, y (B, out) float32
sf::Problem problem(const In& x, const nb::object& bias, const Out& y) {
  check_array(x, "x", 2);
  check_dtype(x, "x", nb::dtype<float>(), "float32");
  check_array(y, "y", 2);
  check_dtype(y, "y", nb::dtype<float>(), "float32");
  sf::Problem p;
  p.x = static_cast<const float*>(x.data());
  p.B = dim(x, 0);
  p.in = dim(x, 1);
  p.y = static_cast<float*>(y.data());
  p.out = static_cast<int64_t>(y.shape(1));
  if (static_cast<int64_t>(y.shape(0)) != p.B) throw std::invalid_argument("y must have as many rows as x");
  if (!bias.is_none()) {
    In b = nb::cast<In>(bias);
    check_array(b, "bias", 1);
    check_dtype(b, "bias", nb::dtype<float>(), "float32");
    if (dim(b, 0) != p.out) throw std::invalid_argument("bias must have shape (out_features,)");
    p.bias = static_cast<const float*>(b.data());
  }
  return p;
}

sf::ProblemT problem_t(const In& dy, const Out& dx) {
  check_array(dy, "dy", 2);
  check_dtype(dy, "dy", nb::dtype<float>(), "float32");
  check_array(dx, "dx", 2);
  check_dtype(dx, "dx", nb::dtype<float>(), "float32");
  sf::ProblemT p;
  p.dy = static_cast<const float*>(dy.data());
  p.B = dim(dy, 0);
  p.out = dim(dy, 1);
  p.dx = static_cast<float*>(dx.data());
  p.in = static_cast<int64_t>(dx.shape(1));
  if (static_cast<int64_t>(dx.shape(0)) != p.B) throw std::invalid_argument("dx must have as many rows as dy");
  return p;
}

// x (B, in), dy (B, out), dw float32 with `nnz` elements in any C-contiguous shape of `ndim` dims
sf::ProblemW problem_w(const In& x, const In& dy, const Out& dw, size_t ndim, int64_t nnz) {
  check_array(x, "x", 2);
  check_dtype(x, "x", nb::dtype<float>(), "float32");
  check_array(dy, "dy", 2);
  check_dtype(dy, "dy", nb::dtype<float>(), "float32");
  check_array(dw, "dw", ndim);
  check_dtype(dw, "dw", nb::dtype<float>(), "float32");
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

// y = x @ W^T + bias on a validated view: the dispatched kernel, or the reference when ref is set
template <class View>
void linear_call(const View& w, const sf::Problem& p, const std::string& isa, const std::string& algo, bool ref,
                 void (*fast)(const View&, const sf::Problem&, sf::Isa, int),
                 void (*oracle)(const View&, const sf::Problem&)) {
  if (w.rows != p.out) throw std::invalid_argument("y must have one column per weight row");
  const sf::Isa i = ref ? sf::Isa::scalar : resolve(isa);
  const int a = parse_algo(algo);
  nb::gil_scoped_release rel;
  if (ref) oracle(w, p); else fast(w, p, i, a);
}

// the view, after checking that dy has one column per weight row
template <class View>
const View& checked_rows(const View& w, const sf::ProblemT& p) {
  if (w.rows != p.out) throw std::invalid_argument("dy must have one column per weight row");
  return w;
}

// dx = dy @ W on a validated view (kernel or reference)
template <class View>
void linear_t_call(const View& w, const sf::ProblemT& p, const std::string& isa, bool ref,
                   void (*fast)(const View&, const sf::ProblemT&, sf::Isa),
                   void (*oracle)(const View&, const sf::ProblemT&)) {
  const sf::Isa i = ref ? sf::Isa::scalar : resolve(isa);
  nb::gil_scoped_release rel;
  if (ref) oracle(w, p); else fast(w, p, i);
}

bool index_u16(const In& idx, const char* name, int64_t count) {
  if (idx.dtype() == nb::dtype<uint16_t>() || idx.dtype() == nb::dtype<int16_t>()) {
    if (count > 65536) throw std::invalid_argument(std::string("16-bit ") + name + " need at most 65536 columns");
    return true;  // int16 storage is read as uint16
  }
  if (idx.dtype() == nb::dtype<int32_t>()) return false;
  throw std::invalid_argument(std::string(name) + " must be uint16 or int32, got " + dtype_name(idx.dtype()));
}

// values (rows, k) float32/bf16, indices (rows, k) uint16/int32; cols from the activations
sf::FanInView fanin_view(const In& values, const In& indices, int64_t cols) {
  check_array(values, "values", 2);
  check_array(indices, "indices", 2);
  sf::FanInView w;
  w.rows = dim(values, 0);
  w.k = dim(values, 1);
  w.cols = cols;
  if (dim(indices, 0) != w.rows || dim(indices, 1) != w.k) {
    throw std::invalid_argument("indices must have the shape of values (rows, k)");
  }
  if (w.k > cols) throw std::invalid_argument("fan-in k is larger than in_features");
  w.idx_u16 = index_u16(indices, "indices", cols);
  w.vt = value_type(values, "values");
  w.idx = indices.data();
  w.val = values.data();
  return w;
}

// block_row_ptr (rows/h + 1,) int32, block_col (nblocks,) uint16/int32, values (nblocks, h, w)
sf::BsrView bsr_view(const In& brp, const In& bcol, const In& values, int64_t rows, int64_t cols) {
  check_array(brp, "block_row_ptr", 1);
  check_dtype(brp, "block_row_ptr", nb::dtype<int32_t>(), "int32");
  check_array(bcol, "block_col", 1);
  check_array(values, "values", 3);
  sf::BsrView w;
  w.nblocks = dim(values, 0);
  w.h = dim(values, 1);
  w.w = dim(values, 2);
  w.rows = rows;
  w.cols = cols;
  if (w.h < 1 || w.w < 1 || rows % w.h || cols % w.w || dim(brp, 0) != rows / w.h + 1) {
    throw std::invalid_argument("BSR blocks of " + std::to_string(w.h) + "x" + std::to_string(w.w) + " with " +
                                std::to_string(dim(brp, 0)) + " block row pointers do not tile a " +
                                std::to_string(rows) + "x" + std::to_string(cols) + " weight");
  }
  if (dim(bcol, 0) != w.nblocks) throw std::invalid_argument("block_col must have one entry per block");
  w.bcol_u16 = index_u16(bcol, "block_col", cols / w.w);
  w.vt = value_type(values, "values");
  w.brp = static_cast<const int32_t*>(brp.data());
  w.bcol = bcol.data();
  w.val = values.data();
  if (w.brp[0] != 0 || w.brp[rows / w.h] != w.nblocks) {
    throw std::invalid_argument("block_row_ptr must start at 0 and end at nblocks = len(values)");
  }
  return w;
}

// SDDMM on a validated view: the dispatched kernel, or the reference when ref is set
template <class View>
void sddmm_call(const View& w, int64_t nnz, const In& x, const In& dy, const Out& dw, size_t ndim,
                const std::string& isa, bool ref, void (*fast)(const View&, const sf::ProblemW&, sf::Isa),
                void (*oracle)(const View&, const sf::ProblemW&)) {
  const sf::ProblemW p = problem_w(x, dy, dw, ndim, nnz);
  const sf::Isa i = ref ? sf::Isa::scalar : resolve(isa);
  nb::gil_scoped_release rel;
  if (ref) oracle(w, p); else fast(w, p, i);
}

sf::CsrView csr_view(const In& row_ptr, const In& col, const In& values, int64_t cols) {
  check_array(row_ptr, "row_ptr", 1);
  check_dtype(row_ptr, "row_ptr", nb::dtype<int32_t>(), "int32");
  check_array(col, "col", 1);
  check_array(values, "values", 1);
  sf::CsrView w;
  w.rows = dim(row_ptr, 0) - 1;
  w.cols = cols;
  w.nnz = dim(values, 0);
  if (w.rows < 0) throw std::invalid_argument("row_ptr must have rows + 1 >= 1 entries");
  if (col.dtype() == nb::dtype<uint16_t>() || col.dtype() == nb::dtype<int16_t>()) {
    w.col_u16 = true;  // int16 storage is read as uint16
    if (cols > 65536) throw std::invalid_argument("16-bit column indices need cols <= 65536");
  } else if (col.dtype() == nb::dtype<int32_t>()) {
    w.col_u16 = false;
  } else {
    throw std::invalid_argument("col must be uint16 or int32, got " + dtype_name(col.dtype()));
  }
  if (dim(col, 0) != w.nnz) throw std::invalid_argument("col and values must have the same length (nnz)");
  w.vt = value_type(values, "values");
  w.row_ptr = static_cast<const int32_t*>(row_ptr.data());
  w.col = col.data();
  w.val = values.data();
  if (w.row_ptr[0] != 0 || w.row_ptr[w.rows] != w.nnz) {
    throw std::invalid_argument("row_ptr must start at 0 and end at nnz = len(values)");
  }
  return w;
}

sf::BitmapView bitmap_view(const In& bits, const In& row_offsets, const In& values, int64_t cols) {
  check_array(bits, "bitmap", 2);
  check_dtype(bits, "bitmap", nb::dtype<uint8_t>(), "uint8");
  check_array(row_offsets, "row_offsets", 1);
  check_dtype(row_offsets, "row_offsets", nb::dtype<int64_t>(), "int64");
  check_array(values, "values", 1);
  sf::BitmapView w;
  w.rows = dim(bits, 0);
  w.cols = cols;
  w.bpr = dim(bits, 1);
  w.nnz = dim(values, 0);
  if (w.bpr != (cols + 7) / 8) {
    throw std::invalid_argument("bitmap must have ceil(in_features / 8) = " + std::to_string((cols + 7) / 8) +
                                " bytes per row, got " + std::to_string(w.bpr));
  }
  if (dim(row_offsets, 0) != w.rows + 1) throw std::invalid_argument("row_offsets must have rows + 1 entries");
  w.vt = value_type(values, "values");
  w.bits = static_cast<const uint8_t*>(bits.data());
  w.row_offsets = static_cast<const int64_t*>(row_offsets.data());
  w.val = values.data();
  if (w.row_offsets[0] != 0 || w.row_offsets[w.rows] != w.nnz) {
    throw std::invalid_argument("row_offsets must start at 0 and end at nnz = len(values)");
  }
  return w;
}

sf::NmView nm_view(const In& values, const In& indices, int n, int m, int64_t cols) {
  check_array(values, "values", 2);
  check_array(indices, "indices", 2);
  check_dtype(indices, "indices", nb::dtype<uint8_t>(), "uint8");
  if (!(0 < n && n < m && m <= 256)) throw std::invalid_argument("N:M needs 0 < n < m <= 256");
  if (cols % m) throw std::invalid_argument("in_features must be divisible by m");
  sf::NmView w;
  w.rows = dim(values, 0);
  w.cols = cols;
  w.n = n;
  w.m = m;
  int b = 1;
  while ((1 << b) < m) ++b;
  w.b = b;
  w.vpr = cols / m * n;
  w.ibpr = (w.vpr * b + 7) / 8;
  if (dim(values, 1) != w.vpr) {
    throw std::invalid_argument("values must have shape (rows, in_features / m * n) = (" + std::to_string(w.rows) +
                                ", " + std::to_string(w.vpr) + ")");
  }
  if (dim(indices, 0) != w.rows || dim(indices, 1) != w.ibpr) {
    throw std::invalid_argument("indices must have shape (rows, ceil(values_per_row * bits / 8)) = (" +
                                std::to_string(w.rows) + ", " + std::to_string(w.ibpr) + ")");
  }
  w.vt = value_type(values, "values");
  w.val = values.data();
  w.idx = static_cast<const uint8_t*>(indices.data());
  return w;
}

// ---- few-token expert FFN (expert_gemv.h): x (T, d), experts (T, k) int64, weights (T, k),
// w_up / w_gate (E, d, h), w_down (E, h, d), all float32; y (T, d) overwritten.
sf::Act parse_act(const std::string& a) {
  if (a == "silu") return sf::Act::silu;
  if (a == "gelu") return sf::Act::gelu;
  if (a == "gelu_tanh") return sf::Act::gelu_tanh;
  if (a == "relu") return sf::Act::relu;
  throw std::invalid_argument("activation='" + a + "' must be 'silu', 'gelu', 'gelu_tanh' or 'relu'");
}

void expert_ffn_call(const In& x, const In& experts, const In& weights, const In& w_up, const In& w_down,
                     const nb::object& w_gate, const Out& y, const std::string& act, const std::string& isa,
                     int64_t block_floats, bool parallel, bool ref) {
  check_array(x, "x", 2);
  check_dtype(x, "x", nb::dtype<float>(), "float32");
  check_array(experts, "experts", 2);
  check_dtype(experts, "experts", nb::dtype<int64_t>(), "int64");
  check_array(weights, "weights", 2);
  check_dtype(weights, "weights", nb::dtype<float>(), "float32");
  check_array(w_up, "w_up", 3);
  check_dtype(w_up, "w_up", nb::dtype<float>(), "float32");
  check_array(w_down, "w_down", 3);
  check_dtype(w_down, "w_down", nb::dtype<float>(), "float32");
  check_array(y, "y", 2);
  check_dtype(y, "y", nb::dtype<float>(), "float32");
  sf::ExpertFfnProblem p;
  p.T = dim(x, 0);
  p.d = dim(x, 1);
  p.E = dim(w_up, 0);
  p.h = dim(w_up, 2);
  p.k = dim(experts, 1);
  if (dim(experts, 0) != p.T || dim(weights, 0) != p.T || dim(weights, 1) != p.k) {
    throw std::invalid_argument("experts and weights must both have shape (T, k) with T = x.shape[0]");
  }
  if (dim(w_up, 1) != p.d || dim(w_down, 0) != p.E || dim(w_down, 1) != p.h || dim(w_down, 2) != p.d) {
    throw std::invalid_argument("expert weights must be w_up (E, d, h) and w_down (E, h, d) with d = x.shape[1]");
  }
  if (static_cast<int64_t>(y.shape(0)) != p.T || static_cast<int64_t>(y.shape(1)) != p.d) {
    throw std::invalid_argument("y must have the shape of x");
  }
  if (!w_gate.is_none()) {
    In g = nb::cast<In>(w_gate);
    check_array(g, "w_gate", 3);
    check_dtype(g, "w_gate", nb::dtype<float>(), "float32");
    if (dim(g, 0) != p.E || dim(g, 1) != p.d || dim(g, 2) != p.h) throw std::invalid_argument("w_gate must have w_up's shape");
    p.w_gate = static_cast<const float*>(g.data());
  }
  p.x = static_cast<const float*>(x.data());
  p.experts = static_cast<const int64_t*>(experts.data());
  p.weights = static_cast<const float*>(weights.data());
  p.w_up = static_cast<const float*>(w_up.data());
  p.w_down = static_cast<const float*>(w_down.data());
  p.y = static_cast<float*>(y.data());
  p.act = parse_act(act);
  if (ref) {
    nb::gil_scoped_release rel;
    sf::expert_ffn_ref(p);
    return;
  }
  const sf::Isa i = resolve(isa);
  threads();  // a bad SPARSEFORGE_NUM_THREADS is a ConfigError here, not inside the kernel
  nb::gil_scoped_release rel;
  sf::expert_ffn(p, i, block_floats, parallel);
}

}  // namespace

void register_attention(nb::module_& mod);  // _native_attention.cpp

NB_MODULE(_native, mod) {
  register_attention(mod);
  mod.doc() = "sparseforge native CPU kernels (torch-free C++17; see docs/kernels.md)";

  mod.def("isa", [](const std::string& requested) { return std::string(sf::isa_name(resolve(requested))); },
          "requested"_a = "",
          "Kernel path a call would use now: SPARSEFORGE_ISA if set, else the best this CPU has.");
  mod.def("best_isa", [] { return std::string(sf::isa_name(sf::best_isa())); });
  mod.def("cpu_supports", [](const std::string& name) {
    if (name == "scalar") return true;
    if (name == "avx2") return sf::compiled_with(sf::Isa::avx2) && sf::cpu_supports(sf::Isa::avx2);
    if (name == "avx512") return sf::compiled_with(sf::Isa::avx512) && sf::cpu_supports(sf::Isa::avx512);
    throw std::invalid_argument("unknown kernel path '" + name + "'");
  });
  mod.def("num_threads", &threads, "Threads the kernels use (the caller included).");
  mod.def("set_num_threads", [](int n) {
    try {
      sf::set_num_threads(n);
    } catch (const std::invalid_argument& e) {
      raise_config_error(e.what());
    }
  });

  // ---- CSR, bitmap, N:M: y = x @ W^T ("<fmt>_linear") and dx = dy @ W ("<fmt>_linear_t"); the "_ref"
  // variants run the scalar oracle (isa and algo ignored)
  for (const bool ref : {false, true}) {
    const std::string sfx = ref ? "_ref" : "";
    mod.def(("csr_linear" + sfx).c_str(),
            [ref](const In& x, const In& row_ptr, const In& col, const In& values, const nb::object& bias, const Out& y,
                  const std::string& isa, const std::string& algo) {
              const sf::Problem p = problem(x, bias, y);
              linear_call(csr_view(row_ptr, col, values, p.in), p, isa, algo, ref, sf::csr_linear, sf::csr_linear_ref);
            },
            "x"_a, "row_ptr"_a, "col"_a, "values"_a, "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto");
    mod.def(("csr_linear_t" + sfx).c_str(),
            [ref](const In& dy, const In& row_ptr, const In& col, const In& values, const Out& dx, const std::string& isa) {
              const sf::ProblemT p = problem_t(dy, dx);
              linear_t_call(checked_rows(csr_view(row_ptr, col, values, p.in), p), p, isa, ref, sf::csr_linear_t,
                            sf::csr_linear_t_ref);
            },
            "dy"_a, "row_ptr"_a, "col"_a, "values"_a, "dx"_a, "isa"_a = "");
    mod.def(("bitmap_linear" + sfx).c_str(),
            [ref](const In& x, const In& bits, const In& row_offsets, const In& values, const nb::object& bias,
                  const Out& y, const std::string& isa, const std::string& algo) {
              const sf::Problem p = problem(x, bias, y);
              linear_call(bitmap_view(bits, row_offsets, values, p.in), p, isa, algo, ref, sf::bitmap_linear,
                          sf::bitmap_linear_ref);
            },
            "x"_a, "bitmap"_a, "row_offsets"_a, "values"_a, "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto");
    mod.def(("bitmap_linear_t" + sfx).c_str(),
            [ref](const In& dy, const In& bits, const In& row_offsets, const In& values, const Out& dx,
                  const std::string& isa) {
              const sf::ProblemT p = problem_t(dy, dx);
              linear_t_call(checked_rows(bitmap_view(bits, row_offsets, values, p.in), p), p, isa, ref,
                            sf::bitmap_linear_t, sf::bitmap_linear_t_ref);
            },
            "dy"_a, "bitmap"_a, "row_offsets"_a, "values"_a, "dx"_a, "isa"_a = "");
    mod.def(("nm_linear" + sfx).c_str(),
            [ref](const In& x, const In& values, const In& indices, int n, int m, const nb::object& bias, const Out& y,
                  const std::string& isa, const std::string& algo) {
              const sf::Problem p = problem(x, bias, y);
              linear_call(nm_view(values, indices, n, m, p.in), p, isa, algo, ref, sf::nm_linear, sf::nm_linear_ref);
            },
            "x"_a, "values"_a, "indices"_a, "n"_a, "m"_a, "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto");
    mod.def(("nm_linear_t" + sfx).c_str(),
            [ref](const In& dy, const In& values, const In& indices, int n, int m, const Out& dx, const std::string& isa) {
              const sf::ProblemT p = problem_t(dy, dx);
              linear_t_call(checked_rows(nm_view(values, indices, n, m, p.in), p), p, isa, ref, sf::nm_linear_t,
                            sf::nm_linear_t_ref);
            },
            "dy"_a, "values"_a, "indices"_a, "n"_a, "m"_a, "dx"_a, "isa"_a = "");
  }

  // ---- dW restricted to the mask (SDDMM): dw[q] = sum_b dy[b, r_q] * x[b, c_q] per stored entry q.
  // "<fmt>_sddmm" runs the dispatched kernel, "<fmt>_sddmm_ref" the scalar oracle (isa ignored).
  for (const bool ref : {false, true}) {
    const std::string sfx = ref ? "_sddmm_ref" : "_sddmm";
    mod.def(("csr" + sfx).c_str(),
            [ref](const In& x, const In& dy, const In& row_ptr, const In& col, const In& values, const Out& dw,
                  const std::string& isa) {
              const sf::CsrView w = csr_view(row_ptr, col, values, dim(x, 1));
              sddmm_call(w, w.nnz, x, dy, dw, 1, isa, ref, sf::csr_sddmm, sf::csr_sddmm_ref);
            },
            "x"_a, "dy"_a, "row_ptr"_a, "col"_a, "values"_a, "dw"_a, "isa"_a = "");
    mod.def(("bitmap" + sfx).c_str(),
            [ref](const In& x, const In& dy, const In& bits, const In& row_offsets, const In& values, const Out& dw,
                  const std::string& isa) {
              const sf::BitmapView w = bitmap_view(bits, row_offsets, values, dim(x, 1));
              sddmm_call(w, w.nnz, x, dy, dw, 1, isa, ref, sf::bitmap_sddmm, sf::bitmap_sddmm_ref);
            },
            "x"_a, "dy"_a, "bitmap"_a, "row_offsets"_a, "values"_a, "dw"_a, "isa"_a = "");
    mod.def(("nm" + sfx).c_str(),
            [ref](const In& x, const In& dy, const In& values, const In& indices, int n, int m, const Out& dw,
                  const std::string& isa) {
              const sf::NmView w = nm_view(values, indices, n, m, dim(x, 1));
              sddmm_call(w, w.rows * w.vpr, x, dy, dw, 2, isa, ref, sf::nm_sddmm, sf::nm_sddmm_ref);
            },
            "x"_a, "dy"_a, "values"_a, "indices"_a, "n"_a, "m"_a, "dw"_a, "isa"_a = "");
  }

  // ---- constant fan-in and BSR: "<name>" runs the dispatched kernel, "<name>_ref" the oracle
  for (const bool ref : {false, true}) {
    const std::string sfx = ref ? "_ref" : "";
    mod.def(("fanin_linear" + sfx).c_str(),
            [ref](const In& x, const In& values, const In& indices, const nb::object& bias, const Out& y,
                  const std::string& isa, const std::string& algo) {
              const sf::Problem p = problem(x, bias, y);
              linear_call(fanin_view(values, indices, p.in), p, isa, algo, ref, sf::fanin_linear, sf::fanin_linear_ref);
            },
            "x"_a, "values"_a, "indices"_a, "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto");
    mod.def(("fanin_linear_t" + sfx).c_str(),
            [ref](const In& dy, const In& values, const In& indices, const Out& dx, const std::string& isa) {
              const sf::ProblemT p = problem_t(dy, dx);
              linear_t_call(checked_rows(fanin_view(values, indices, p.in), p), p, isa, ref, sf::fanin_linear_t,
                            sf::fanin_linear_t_ref);
            },
            "dy"_a, "values"_a, "indices"_a, "dx"_a, "isa"_a = "");
    mod.def(("fanin_sddmm" + sfx).c_str(),
            [ref](const In& x, const In& dy, const In& values, const In& indices, const Out& dw,
                  const std::string& isa) {
              const sf::FanInView w = fanin_view(values, indices, dim(x, 1));
              sddmm_call(w, w.rows * w.k, x, dy, dw, 2, isa, ref, sf::fanin_sddmm, sf::fanin_sddmm_ref);
            },
            "x"_a, "dy"_a, "values"_a, "indices"_a, "dw"_a, "isa"_a = "");
    mod.def(("bsr_linear" + sfx).c_str(),
            [ref](const In& x, const In& brp, const In& bcol, const In& values, const nb::object& bias, const Out& y,
                  const std::string& isa, const std::string& algo) {
              const sf::Problem p = problem(x, bias, y);
              linear_call(bsr_view(brp, bcol, values, p.out, p.in), p, isa, algo, ref, sf::bsr_linear, sf::bsr_linear_ref);
            },
            "x"_a, "block_row_ptr"_a, "block_col"_a, "values"_a, "bias"_a.none(), "y"_a, "isa"_a = "",
            "algo"_a = "auto");
    mod.def(("bsr_linear_t" + sfx).c_str(),
            [ref](const In& dy, const In& brp, const In& bcol, const In& values, const Out& dx, const std::string& isa) {
              const sf::ProblemT p = problem_t(dy, dx);
              linear_t_call(bsr_view(brp, bcol, values, p.out, p.in), p, isa, ref, sf::bsr_linear_t, sf::bsr_linear_t_ref);
            },
            "dy"_a, "block_row_ptr"_a, "block_col"_a, "values"_a, "dx"_a, "isa"_a = "");
    mod.def(("bsr_sddmm" + sfx).c_str(),
            [ref](const In& x, const In& dy, const In& brp, const In& bcol, const In& values, const Out& dw,
                  const std::string& isa) {
              const sf::BsrView w = bsr_view(brp, bcol, values, dim(dy, 1), dim(x, 1));
              sddmm_call(w, w.nblocks * w.h * w.w, x, dy, dw, 3, isa, ref, sf::bsr_sddmm, sf::bsr_sddmm_ref);
            },
            "x"_a, "dy"_a, "block_row_ptr"_a, "block_col"_a, "values"_a, "dw"_a, "isa"_a = "");
  }
  // ---- few-token expert FFN (MoE decode): "expert_ffn" runs the dispatched kernel, "expert_ffn_ref" the oracle
  for (const bool ref : {false, true}) {
    mod.def(ref ? "expert_ffn_ref" : "expert_ffn",
            [ref](const In& x, const In& experts, const In& weights, const In& w_up, const In& w_down,
                  const nb::object& w_gate, const Out& y, const std::string& activation, const std::string& isa,
                  int64_t block_floats, bool parallel) {
              expert_ffn_call(x, experts, weights, w_up, w_down, w_gate, y, activation, isa, block_floats, parallel, ref);
            },
            "x"_a, "experts"_a, "weights"_a, "w_up"_a, "w_down"_a, "w_gate"_a.none(), "y"_a, "activation"_a = "silu",
            "isa"_a = "", "block_floats"_a = 0, "parallel"_a = true);
  }
}
