// Binding of the column-sparse linear layer (csrc/column_sparse.h: activation x weight sparsity):
//   column_sparse_linear(x, bitmap, block_ptr, values, thresholds, bias, y, isa="", algo="auto", parallel=True,
//                        scales=None)
//   column_sparse_linear_ref(x, bitmap, block_ptr, values, thresholds, bias, y, scales=None)   the scalar oracle
//   column_sparse_check(bitmap, block_ptr, values, out, scales=None)   the full buffer check (once per weight)
//   column_sparse_walk(isa="")   the batch-1 walk that path runs ("avx512_vbmi2", "avx512", "avx2", "scalar")
//   column_sparse_linear_bf16(x, ..., y, path="", parallel=True)   the same in bf16 compute (column_sparse_bf16.h)
//   column_sparse_linear_bf16_ref(x, ..., y)                      its scalar oracle
//   ColumnSparseGroup([(bitmap, block_ptr, values, thresholds, bias, out, scales), ...], isa="")
//       members bound once (their arrays kept alive); group(x, y): y (1, sum of outs) = the members'
//       products of x side by side, in one pool job (column_sparse_linear_group)
// x (B, in) float32, bitmap (in, ceil(out / 64)) int64 / uint64 words, block_ptr (in * ceil(out / 512)
// + 1,) int64, values (nnz,) float32, bfloat16 (or its raw uint16 bits) or int8 (then scales (out,)
// float32, one per output row; the bf16 entry points take no int8), thresholds (1,) or (in,)
// float32, bias (out,) float32 or None, y (B, out) float32 written in place.
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "binding.h"
#include "column_sparse.h"
#include "column_sparse_bf16.h"

namespace sfb {

using namespace nb::literals;

namespace {

bool is_int64(const In& a) { return a.dtype() == nb::dtype<int64_t>() || a.dtype() == nb::dtype<uint64_t>(); }

sf::ColumnSparseWeight column_weight(const In& bitmap, const In& block_ptr, const In& values, int64_t out,
                                     const nb::object& scales) {
  check_array(bitmap, "bitmap", 2);
  check_array(block_ptr, "block_ptr", 1);
  check_array(values, "values", 1);
  sf::ColumnSparseWeight w;
  w.in = dim(bitmap, 0);
  w.out = out;
  if (!is_int64(bitmap) || dim(bitmap, 1) != w.words()) {
    throw sf::InvalidWeight("column_sparse_linear: bitmap must be int64 words of shape (" + std::to_string(w.in) + ", " +
                            std::to_string(w.words()) + ")");
  }
  if (block_ptr.dtype() != nb::dtype<int64_t>() || dim(block_ptr, 0) != w.in * w.nblk() + 1) {
    throw sf::InvalidWeight("column_sparse_linear: block_ptr must be int64 of shape (" +
                            std::to_string(w.in * w.nblk() + 1) + ",)");
  }
  if (values.dtype() == nb::dtype<float>()) {
    w.vt = sf::VT::f32;
  } else if (values.dtype() == nb::dtype<uint16_t>() ||
             (values.dtype().code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && values.dtype().bits == 16)) {
    w.vt = sf::VT::bf16;
  } else if (values.dtype() == nb::dtype<int8_t>()) {
    w.vt = sf::VT::i8;
  } else {
    throw sf::InvalidWeight("column_sparse_linear: values must be float32, bfloat16 or int8");
  }
  if (w.vt == sf::VT::i8) {
    if (scales.is_none()) {
      throw sf::InvalidWeight("column_sparse_linear: int8 values need float32 scales of shape (" + std::to_string(out) +
                              ",), one per output row");
    }
    const In s = nb::cast<In>(scales);
    check_f32(s, "scales", 1);
    if (dim(s, 0) != out) {
      throw sf::InvalidWeight("column_sparse_linear: scales must be float32 of shape (" + std::to_string(out) +
                              ",), one per output row, got " + std::to_string(dim(s, 0)) + " entries");
    }
    w.scales = static_cast<const float*>(s.data());
  } else if (!scales.is_none()) {
    throw sf::InvalidWeight("column_sparse_linear: scales are for int8 values only");
  }
  w.bitmap = static_cast<const uint64_t*>(bitmap.data());
  w.block_ptr = static_cast<const int64_t*>(block_ptr.data());
  w.values = values.data();
  w.nnz = dim(values, 0);
  return w;
}

sf::ColumnSparseProblem linear_problem(const In& x, const In& bitmap, const In& block_ptr, const In& values,
                                       const In& thr, const nb::object& bias, const Out& y,
                                       const nb::object& scales) {
  const sf::Problem d = problem(x, bias, y);  // x (B, in), y (B, out), bias (out,) or None
  check_f32(thr, "thresholds", 1);
  sf::ColumnSparseProblem p;
  p.w = column_weight(bitmap, block_ptr, values, d.out, scales);
  if (d.in != p.w.in) {
    throw std::invalid_argument("x has " + std::to_string(d.in) + " input features but the weight has " +
                                std::to_string(p.w.in));
  }
  if (dim(thr, 0) != 1 && dim(thr, 0) != d.in) {
    throw std::invalid_argument("thresholds must have 1 or in_features (" + std::to_string(d.in) + ") entries, got " +
                                std::to_string(dim(thr, 0)));
  }
  p.x = d.x;
  p.B = d.B;
  p.thr = static_cast<const float*>(thr.data());
  p.thr_per_channel = dim(thr, 0) == d.in && d.in != 1;
  p.bias = d.bias;
  p.y = d.y;
  return p;
}

int parse_cs_algo(const std::string& algo) {
  if (algo == "auto") return 0;
  if (algo == "gemv") return 1;
  if (algo == "gemm") return 2;
  throw std::invalid_argument("algo='" + algo + "' must be 'auto', 'gemv' or 'gemm'");
}

// name(x, bitmap, block_ptr, values, thresholds, bias, y): a scalar oracle over the same arguments
template <void (*Ref)(const sf::ColumnSparseProblem&)>
void def_reference(nb::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [](const In& x, const In& bitmap, const In& block_ptr, const In& values, const In& thr, const nb::object& bias,
         const Out& y, const nb::object& scales) {
        const sf::ColumnSparseProblem p = linear_problem(x, bitmap, block_ptr, values, thr, bias, y, scales);
        nb::gil_scoped_release rel;
        Ref(p);
      },
      "x"_a, "bitmap"_a, "block_ptr"_a, "values"_a, "thresholds"_a, "bias"_a.none(), "y"_a, "scales"_a.none() = nb::none(),
      doc);
}

}  // namespace

// Sibling products of one input bound once: the members' weights, thresholds and biases are checked
// and their arrays held, so a call converts only x and y.
struct ColumnSparseGroup {
  std::vector<In> held;                         // the members' arrays, alive while bound
  std::vector<sf::ColumnSparseProblem> members;  // x, B and y filled per call
  std::vector<int64_t> offsets;                 // member m's outputs start at column offsets[m] of y
  int64_t in = 0, out = 0;
  sf::Isa isa{};

  ColumnSparseGroup(const std::vector<nb::tuple>& specs, const std::string& isa_name) : isa(resolve(isa_name)) {
    if (specs.empty()) throw std::invalid_argument("ColumnSparseGroup needs at least one member");
    for (const nb::tuple& t : specs) {
      if (t.size() != 7) {
        throw std::invalid_argument("each ColumnSparseGroup member is (bitmap, block_ptr, values, thresholds, bias, out, scales)");
      }
      const In bitmap = nb::cast<In>(t[0]), block_ptr = nb::cast<In>(t[1]), values = nb::cast<In>(t[2]);
      const In thr = nb::cast<In>(t[3]);
      const int64_t mout = nb::cast<int64_t>(t[5]);
      if (mout < 0) throw std::invalid_argument("out must be >= 0");
      sf::ColumnSparseProblem p;
      p.w = column_weight(bitmap, block_ptr, values, mout, nb::borrow<nb::object>(t[6]));
      if (!members.empty() && p.w.in != in) {
        throw std::invalid_argument("ColumnSparseGroup members must share the input size: " + std::to_string(in) +
                                    " and " + std::to_string(p.w.in));
      }
      in = p.w.in;
      check_f32(thr, "thresholds", 1);
      if (dim(thr, 0) != 1 && dim(thr, 0) != in) {
        throw std::invalid_argument("thresholds must have 1 or in_features (" + std::to_string(in) + ") entries, got " +
                                    std::to_string(dim(thr, 0)));
      }
      p.thr = static_cast<const float*>(thr.data());
      p.thr_per_channel = dim(thr, 0) == in && in != 1;
      p.bias = bias_of(nb::borrow<nb::object>(t[4]), mout);
      {
        nb::gil_scoped_release rel;
        sf::column_sparse_check_weight(p.w);
      }
      for (const In& a : {bitmap, block_ptr, values, thr}) held.push_back(a);
      if (!t[4].is_none()) held.push_back(nb::cast<In>(t[4]));
      if (!t[6].is_none()) held.push_back(nb::cast<In>(t[6]));
      offsets.push_back(out);
      out += mout;
      members.push_back(p);
    }
  }

  void call(const In& x, const Out& y) {
    check_f32(x, "x", 2);
    check_out(y, "y", 2);
    if (dim(x, 1) != in || static_cast<int64_t>(y.shape(1)) != out || static_cast<int64_t>(y.shape(0)) != dim(x, 0)) {
      throw std::invalid_argument("ColumnSparseGroup: x must be (B, " + std::to_string(in) + ") and y (B, " +
                                  std::to_string(out) + ") float32");
    }
    if (y.dtype() != nb::dtype<float>()) throw std::invalid_argument("y must be float32");
    const int64_t B = dim(x, 0);
    const float* xp = static_cast<const float*>(x.data());
    float* yp = static_cast<float*>(y.data());
    threads();
    if (B == 1) {  // y (1, out): member m writes its columns in place
      for (size_t m = 0; m < members.size(); ++m) {
        members[m].x = xp;
        members[m].B = 1;
        members[m].y = yp + offsets[m];
      }
      nb::gil_scoped_release rel;
      sf::column_sparse_linear_group(members.data(), static_cast<int64_t>(members.size()), isa);
      return;
    }
    // several rows: each member into its own (B, out_m) block, then side by side
    std::vector<float> part;
    nb::gil_scoped_release rel;
    for (size_t m = 0; m < members.size(); ++m) {
      sf::ColumnSparseProblem p = members[m];
      const int64_t mo = p.w.out;
      part.assign(static_cast<size_t>(B * mo), 0.f);
      p.x = xp;
      p.B = B;
      p.y = part.data();
      sf::column_sparse_linear(p, isa);
      for (int64_t b = 0; b < B; ++b) {
        std::copy(part.begin() + b * mo, part.begin() + (b + 1) * mo, yp + b * out + offsets[m]);
      }
    }
  }
};

void register_column_sparse(nb::module_& m) {
  nb::class_<ColumnSparseGroup>(m, "ColumnSparseGroup",
                                "Sibling column-sparse products of one input (q/k/v, gate/up), each with its own "
                                "thresholds and bias, bound once; group(x, y) writes them side by side into y in one "
                                "pool job (csrc/column_sparse.h: column_sparse_linear_group).")
      .def(nb::init<const std::vector<nb::tuple>&, const std::string&>(), "members"_a, "isa"_a = "")
      .def("__call__", &ColumnSparseGroup::call, "x"_a, "y"_a)
      .def_ro("in_features", &ColumnSparseGroup::in)
      .def_ro("out_features", &ColumnSparseGroup::out);

  m.def(
      "column_sparse_linear",
      [](const In& x, const In& bitmap, const In& block_ptr, const In& values, const In& thr, const nb::object& bias,
         const Out& y, const std::string& isa, const std::string& algo, bool parallel, const nb::object& scales) {
        const sf::ColumnSparseProblem p = linear_problem(x, bitmap, block_ptr, values, thr, bias, y, scales);
        const int a = parse_cs_algo(algo);
        const sf::Isa i = resolve(isa);
        threads();
        nb::gil_scoped_release rel;
        sf::column_sparse_linear(p, i, a, parallel);
      },
      "x"_a, "bitmap"_a, "block_ptr"_a, "values"_a, "thresholds"_a, "bias"_a.none(), "y"_a, "isa"_a = "",
      "algo"_a = "auto", "parallel"_a = true, "scales"_a.none() = nb::none(),
      "y (B, out) = (x with channels |x| <= threshold skipped) @ W^T + bias, W stored per input channel as a "
      "bitmap + packed values; see csrc/column_sparse.h.");
  def_reference<sf::column_sparse_linear_ref>(m, "column_sparse_linear_ref",
                                              "Scalar reference of column_sparse_linear (test oracle).");
  m.def(
      "column_sparse_linear_bf16",
      [](const In& x, const In& bitmap, const In& block_ptr, const In& values, const In& thr, const nb::object& bias,
         const Out& y, const std::string& path, bool parallel) {
        const sf::ColumnSparseProblem p = linear_problem(x, bitmap, block_ptr, values, thr, bias, y, nb::none());
        const sf::Bf16Path bp = resolve_bf16(path);
        threads();
        nb::gil_scoped_release rel;
        sf::column_sparse_linear_bf16(p, bp, parallel);
      },
      "x"_a, "bitmap"_a, "block_ptr"_a, "values"_a, "thresholds"_a, "bias"_a.none(), "y"_a, "path"_a = "",
      "parallel"_a = true,
      "column_sparse_linear in bf16 compute: the kept x values and the weights rounded to bf16, float32 "
      "accumulation, on the AMX / avx512_bf16 / scalar path; see csrc/column_sparse_bf16.h.");
  def_reference<sf::column_sparse_linear_bf16_ref>(m, "column_sparse_linear_bf16_ref",
                                                   "Scalar reference of column_sparse_linear_bf16 (test oracle).");
  m.def(
      "column_sparse_walk", [](const std::string& isa) { return std::string(sf::column_sparse_walk(resolve(isa))); },
      "isa"_a = "",
      "The batch-1 walk the path runs: 'avx512_vbmi2' (bfloat16 values expanded by vpexpandw; SPARSEFORGE_VBMI2), "
      "'avx512', 'avx2' or 'scalar'.");
  m.def(
      "column_sparse_check",
      [](const In& bitmap, const In& block_ptr, const In& values, int64_t out, const nb::object& scales) {
        if (out < 0) throw std::invalid_argument("out must be >= 0");
        const sf::ColumnSparseWeight w = column_weight(bitmap, block_ptr, values, out, scales);
        nb::gil_scoped_release rel;
        sf::column_sparse_check_weight(w);
      },
      "bitmap"_a, "block_ptr"_a, "values"_a, "out"_a, "scales"_a.none() = nb::none(),
      "Check a column-sparse weight's buffers (bit counts per block against block_ptr; ModelError otherwise).");
}

}  // namespace sfb
