// Bindings of the sparse linear kernels (CSR, bitmap, N:M, constant fan-in, BSR; CSR, bitmap and N:M
// also with int8 values and float32 row scales, forward only: <fmt>_i8_linear(..., act), <fmt>_i8_check,
// bound from one table of the three formats by def_i8):
//   <fmt>_linear(x, W..., bias, y, isa, algo, check_indices[, col_tile, block_rows])   y = x @ W^T + bias
//   <fmt>_linear_t(dy, W..., dx, isa, check_indices)           dx = dy @ W
//   <fmt>_sddmm(x, dy, W..., dw, isa, check_indices)           dW at the mask
//   <fmt>_check(W..., rows, cols)                              the buffer checks alone
// with "_ref" variants of the first three running the scalar oracle (isa and algo ignored). W... is
// the format's buffers (and N:M's n, m); col_tile / block_rows (CSR, bitmap, N:M, BSR; 0 = the rule)
// set the lanes kernels' tile (csrc/common.h Problem). Every call checks the buffers (csrc/views.h) before a
// kernel runs; check_indices=False skips the index scans for buffers that <fmt>_check accepted.
#include <array>
#include <stdexcept>
#include <string>
#include <utility>

#include "binding.h"
#include "int8.h"
#include "views.h"

namespace sfb {

using namespace nb::literals;

namespace {

// y = x @ W^T + bias on a checked view: the dispatched kernel, or the reference when ref is set
// (p.col_tile / p.block_rows: the lanes kernels' tile, checked by the kernel; the reference ignores it)
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

// dx = dy @ W on a checked view (kernel or reference)
template <class View>
void linear_t_call(const View& w, const sf::ProblemT& p, const std::string& isa, bool ref,
                   void (*fast)(const View&, const sf::ProblemT&, sf::Isa),
                   void (*oracle)(const View&, const sf::ProblemT&)) {
  if (w.rows != p.out) throw std::invalid_argument("dy must have one column per weight row");
  const sf::Isa i = ref ? sf::Isa::scalar : resolve(isa);
  nb::gil_scoped_release rel;
  if (ref) oracle(w, p); else fast(w, p, i);
}

// SDDMM on a checked view (kernel or reference)
template <class View>
void sddmm_call(const View& w, int64_t nnz, const In& x, const In& dy, const Out& dw, size_t ndim,
                const std::string& isa, bool ref, void (*fast)(const View&, const sf::ProblemW&, sf::Isa),
                void (*oracle)(const View&, const sf::ProblemW&)) {
  const sf::ProblemW p = problem_w(x, dy, dw, ndim, nnz);
  const sf::Isa i = ref ? sf::Isa::scalar : resolve(isa);
  nb::gil_scoped_release rel;
  if (ref) oracle(w, p); else fast(w, p, i);
}

// p with the lanes kernels' tile (csrc/common.h Problem::col_tile, block_rows; 0 = the rule)
sf::Problem tiled(sf::Problem p, int64_t col_tile, int64_t block_rows) {
  p.col_tile = col_tile;
  p.block_rows = block_rows;
  return p;
}

// rows of a checked view must be `rows` (the <fmt>_check functions)
void expect_rows(int64_t got, int64_t rows, const char* op) {
  if (got != rows) sf::bad_weight(op, "the buffers describe " + std::to_string(got) + " rows, not " + std::to_string(rows));
}

sf::CsrView csr(const In& rp, const In& col, const In& val, int64_t cols, const std::string& op, bool chk) {
  return sf::csr_view(array(rp, "row_ptr"), array(col, "col"), array(val, "values"), cols, op.c_str(), chk);
}
sf::BitmapView bitmap(const In& bits, const In& ro, const In& val, int64_t cols, const std::string& op, bool chk) {
  return sf::bitmap_view(array(bits, "bitmap"), array(ro, "row_offsets"), array(val, "values"), cols, op.c_str(), chk);
}
sf::NmView nm(const In& val, const In& idx, int n, int m, int64_t cols, const std::string& op, bool chk) {
  return sf::nm_view(array(val, "values"), array(idx, "indices"), n, m, cols, op.c_str(), chk);
}
sf::FanInView fanin(const In& val, const In& idx, int64_t cols, const std::string& op, bool chk) {
  return sf::fanin_view(array(val, "values"), array(idx, "indices"), cols, op.c_str(), chk);
}
sf::BsrView bsr(const In& brp, const In& bcol, const In& val, int64_t rows, int64_t cols, const std::string& op,
                bool chk) {
  return sf::bsr_view(array(brp, "block_row_ptr"), array(bcol, "block_col"), array(val, "values"), rows, cols,
                      op.c_str(), chk);
}

void register_csr(nb::module_& m) {
  for (const bool ref : {false, true}) {
    const std::string sfx = ref ? "_ref" : "";
    const std::string lin = "csr_linear" + sfx, lin_t = "csr_linear_t" + sfx, dw = "csr_sddmm" + sfx;
    m.def(lin.c_str(),
          [ref, lin](const In& x, const In& row_ptr, const In& col, const In& values, const nb::object& bias,
                     const Out& y, const std::string& isa, const std::string& algo, bool check_indices, int64_t col_tile,
                     int64_t block_rows) {
            const sf::Problem p = tiled(problem(x, bias, y), col_tile, block_rows);
            linear_call(csr(row_ptr, col, values, p.in, lin, check_indices), p, isa, algo, ref, sf::csr_linear,
                        sf::csr_linear_ref);
          },
          "x"_a, "row_ptr"_a, "col"_a, "values"_a, "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto",
          "check_indices"_a = true, "col_tile"_a = 0, "block_rows"_a = 0);
    m.def(lin_t.c_str(),
          [ref, lin_t](const In& dy, const In& row_ptr, const In& col, const In& values, const Out& dx,
                       const std::string& isa, bool check_indices) {
            const sf::ProblemT p = problem_t(dy, dx);
            linear_t_call(csr(row_ptr, col, values, p.in, lin_t, check_indices), p, isa, ref, sf::csr_linear_t,
                          sf::csr_linear_t_ref);
          },
          "dy"_a, "row_ptr"_a, "col"_a, "values"_a, "dx"_a, "isa"_a = "", "check_indices"_a = true);
    m.def(dw.c_str(),
          [ref, dw](const In& x, const In& dy, const In& row_ptr, const In& col, const In& values, const Out& out,
                    const std::string& isa, bool check_indices) {
            const sf::CsrView w = csr(row_ptr, col, values, dim(x, 1), dw, check_indices);
            sddmm_call(w, w.nnz, x, dy, out, 1, isa, ref, sf::csr_sddmm, sf::csr_sddmm_ref);
          },
          "x"_a, "dy"_a, "row_ptr"_a, "col"_a, "values"_a, "dw"_a, "isa"_a = "", "check_indices"_a = true);
  }
  m.def("csr_check", [](const In& row_ptr, const In& col, const In& values, int64_t rows, int64_t cols) {
    expect_rows(csr(row_ptr, col, values, cols, "csr_check", true).rows, rows, "csr_check");
  }, "row_ptr"_a, "col"_a, "values"_a, "rows"_a, "cols"_a);
}

void register_bitmap(nb::module_& m) {
  for (const bool ref : {false, true}) {
    const std::string sfx = ref ? "_ref" : "";
    const std::string lin = "bitmap_linear" + sfx, lin_t = "bitmap_linear_t" + sfx, dw = "bitmap_sddmm" + sfx;
    m.def(lin.c_str(),
          [ref, lin](const In& x, const In& bits, const In& row_offsets, const In& values, const nb::object& bias,
                     const Out& y, const std::string& isa, const std::string& algo, bool check_indices, int64_t col_tile,
                     int64_t block_rows) {
            const sf::Problem p = tiled(problem(x, bias, y), col_tile, block_rows);
            linear_call(bitmap(bits, row_offsets, values, p.in, lin, check_indices), p, isa, algo, ref,
                        sf::bitmap_linear, sf::bitmap_linear_ref);
          },
          "x"_a, "bitmap"_a, "row_offsets"_a, "values"_a, "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto",
          "check_indices"_a = true, "col_tile"_a = 0, "block_rows"_a = 0);
    m.def(lin_t.c_str(),
          [ref, lin_t](const In& dy, const In& bits, const In& row_offsets, const In& values, const Out& dx,
                       const std::string& isa, bool check_indices) {
            const sf::ProblemT p = problem_t(dy, dx);
            linear_t_call(bitmap(bits, row_offsets, values, p.in, lin_t, check_indices), p, isa, ref,
                          sf::bitmap_linear_t, sf::bitmap_linear_t_ref);
          },
          "dy"_a, "bitmap"_a, "row_offsets"_a, "values"_a, "dx"_a, "isa"_a = "", "check_indices"_a = true);
    m.def(dw.c_str(),
          [ref, dw](const In& x, const In& dy, const In& bits, const In& row_offsets, const In& values, const Out& out,
                    const std::string& isa, bool check_indices) {
            const sf::BitmapView w = bitmap(bits, row_offsets, values, dim(x, 1), dw, check_indices);
            sddmm_call(w, w.nnz, x, dy, out, 1, isa, ref, sf::bitmap_sddmm, sf::bitmap_sddmm_ref);
          },
          "x"_a, "dy"_a, "bitmap"_a, "row_offsets"_a, "values"_a, "dw"_a, "isa"_a = "", "check_indices"_a = true);
  }
  m.def("bitmap_check", [](const In& bits, const In& row_offsets, const In& values, int64_t rows, int64_t cols) {
    expect_rows(bitmap(bits, row_offsets, values, cols, "bitmap_check", true).rows, rows, "bitmap_check");
  }, "bitmap"_a, "row_offsets"_a, "values"_a, "rows"_a, "cols"_a);
}

void register_nm(nb::module_& m) {
  for (const bool ref : {false, true}) {
    const std::string sfx = ref ? "_ref" : "";
    const std::string lin = "nm_linear" + sfx, lin_t = "nm_linear_t" + sfx, dw = "nm_sddmm" + sfx;
    m.def(lin.c_str(),
          [ref, lin](const In& x, const In& values, const In& indices, int n, int mm, const nb::object& bias,
                     const Out& y, const std::string& isa, const std::string& algo, bool check_indices, int64_t col_tile,
                     int64_t block_rows) {
            const sf::Problem p = tiled(problem(x, bias, y), col_tile, block_rows);
            linear_call(nm(values, indices, n, mm, p.in, lin, check_indices), p, isa, algo, ref, sf::nm_linear,
                        sf::nm_linear_ref);
          },
          "x"_a, "values"_a, "indices"_a, "n"_a, "m"_a, "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto",
          "check_indices"_a = true, "col_tile"_a = 0, "block_rows"_a = 0);
    m.def(lin_t.c_str(),
          [ref, lin_t](const In& dy, const In& values, const In& indices, int n, int mm, const Out& dx,
                       const std::string& isa, bool check_indices) {
            const sf::ProblemT p = problem_t(dy, dx);
            linear_t_call(nm(values, indices, n, mm, p.in, lin_t, check_indices), p, isa, ref, sf::nm_linear_t,
                          sf::nm_linear_t_ref);
          },
          "dy"_a, "values"_a, "indices"_a, "n"_a, "m"_a, "dx"_a, "isa"_a = "", "check_indices"_a = true);
    m.def(dw.c_str(),
          [ref, dw](const In& x, const In& dy, const In& values, const In& indices, int n, int mm, const Out& out,
                    const std::string& isa, bool check_indices) {
            const sf::NmView w = nm(values, indices, n, mm, dim(x, 1), dw, check_indices);
            sddmm_call(w, w.rows * w.vpr, x, dy, out, 2, isa, ref, sf::nm_sddmm, sf::nm_sddmm_ref);
          },
          "x"_a, "dy"_a, "values"_a, "indices"_a, "n"_a, "m"_a, "dw"_a, "isa"_a = "", "check_indices"_a = true);
  }
  m.def("nm_check", [](const In& values, const In& indices, int n, int mm, int64_t rows, int64_t cols) {
    expect_rows(nm(values, indices, n, mm, cols, "nm_check", true).rows, rows, "nm_check");
  }, "values"_a, "indices"_a, "n"_a, "m"_a, "rows"_a, "cols"_a);
}

void register_fanin(nb::module_& m) {
  for (const bool ref : {false, true}) {
    const std::string sfx = ref ? "_ref" : "";
    const std::string lin = "fanin_linear" + sfx, lin_t = "fanin_linear_t" + sfx, dw = "fanin_sddmm" + sfx;
    m.def(lin.c_str(),
          [ref, lin](const In& x, const In& values, const In& indices, const nb::object& bias, const Out& y,
                     const std::string& isa, const std::string& algo, bool check_indices) {
            const sf::Problem p = problem(x, bias, y);
            linear_call(fanin(values, indices, p.in, lin, check_indices), p, isa, algo, ref, sf::fanin_linear,
                        sf::fanin_linear_ref);
          },
          "x"_a, "values"_a, "indices"_a, "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto",
          "check_indices"_a = true);
    m.def(lin_t.c_str(),
          [ref, lin_t](const In& dy, const In& values, const In& indices, const Out& dx, const std::string& isa,
                       bool check_indices) {
            const sf::ProblemT p = problem_t(dy, dx);
            linear_t_call(fanin(values, indices, p.in, lin_t, check_indices), p, isa, ref, sf::fanin_linear_t,
                          sf::fanin_linear_t_ref);
          },
          "dy"_a, "values"_a, "indices"_a, "dx"_a, "isa"_a = "", "check_indices"_a = true);
    m.def(dw.c_str(),
          [ref, dw](const In& x, const In& dy, const In& values, const In& indices, const Out& out,
                    const std::string& isa, bool check_indices) {
            const sf::FanInView w = fanin(values, indices, dim(x, 1), dw, check_indices);
            sddmm_call(w, w.rows * w.k, x, dy, out, 2, isa, ref, sf::fanin_sddmm, sf::fanin_sddmm_ref);
          },
          "x"_a, "dy"_a, "values"_a, "indices"_a, "dw"_a, "isa"_a = "", "check_indices"_a = true);
  }
  m.def("fanin_check", [](const In& values, const In& indices, int64_t rows, int64_t cols) {
    expect_rows(fanin(values, indices, cols, "fanin_check", true).rows, rows, "fanin_check");
  }, "values"_a, "indices"_a, "rows"_a, "cols"_a);
}

void register_bsr(nb::module_& m) {
  for (const bool ref : {false, true}) {
    const std::string sfx = ref ? "_ref" : "";
    const std::string lin = "bsr_linear" + sfx, lin_t = "bsr_linear_t" + sfx, dw = "bsr_sddmm" + sfx;
    m.def(lin.c_str(),
          [ref, lin](const In& x, const In& brp, const In& bcol, const In& values, const nb::object& bias,
                     const Out& y, const std::string& isa, const std::string& algo, bool check_indices, int64_t col_tile,
                     int64_t block_rows) {
            const sf::Problem p = tiled(problem(x, bias, y), col_tile, block_rows);
            linear_call(bsr(brp, bcol, values, p.out, p.in, lin, check_indices), p, isa, algo, ref, sf::bsr_linear,
                        sf::bsr_linear_ref);
          },
          "x"_a, "block_row_ptr"_a, "block_col"_a, "values"_a, "bias"_a.none(), "y"_a, "isa"_a = "",
          "algo"_a = "auto", "check_indices"_a = true, "col_tile"_a = 0, "block_rows"_a = 0);
    m.def(lin_t.c_str(),
          [ref, lin_t](const In& dy, const In& brp, const In& bcol, const In& values, const Out& dx,
                       const std::string& isa, bool check_indices) {
            const sf::ProblemT p = problem_t(dy, dx);
            linear_t_call(bsr(brp, bcol, values, p.out, p.in, lin_t, check_indices), p, isa, ref, sf::bsr_linear_t,
                          sf::bsr_linear_t_ref);
          },
          "dy"_a, "block_row_ptr"_a, "block_col"_a, "values"_a, "dx"_a, "isa"_a = "", "check_indices"_a = true);
    m.def(dw.c_str(),
          [ref, dw](const In& x, const In& dy, const In& brp, const In& bcol, const In& values, const Out& out,
                    const std::string& isa, bool check_indices) {
            const sf::BsrView w = bsr(brp, bcol, values, dim(dy, 1), dim(x, 1), dw, check_indices);
            sddmm_call(w, w.nblocks * w.h * w.w, x, dy, out, 3, isa, ref, sf::bsr_sddmm, sf::bsr_sddmm_ref);
          },
          "x"_a, "dy"_a, "block_row_ptr"_a, "block_col"_a, "values"_a, "dw"_a, "isa"_a = "",
          "check_indices"_a = true);
  }
  m.def("bsr_check", [](const In& brp, const In& bcol, const In& values, int64_t rows, int64_t cols) {
    bsr(brp, bcol, values, rows, cols, "bsr_check", true);
  }, "block_row_ptr"_a, "block_col"_a, "values"_a, "rows"_a, "cols"_a);
}

// act="float" (float32 activations) or "int8" (quantized per batch row, csrc/int8.h I8Act::int8)
sf::I8Act parse_act(const std::string& act) {
  if (act == "float") return sf::I8Act::f32;
  if (act == "int8") return sf::I8Act::int8;
  throw std::invalid_argument("act='" + act + "' is not an activation mode; use 'float' or 'int8'");
}

// One int8-valued format (csrc/int8.h) as its bindings need it: W... are the Python types of its
// weight arguments (buffers, then N:M's n and m), named by `args` in order.
template <class View, class... W>
struct I8Format {
  const char* name;                              // binds <name>_linear, <name>_linear_ref, <name>_check
  std::array<const char*, sizeof...(W)> args;    // the weight arguments' names
  View (*view)(const W&..., int64_t cols, const std::string& op, bool check_indices);  // checked view
  void (*fast)(const View&, const sf::Problem&, sf::Isa, int algo, sf::I8Act);
  void (*ref)(const View&, const sf::Problem&);     // act='float' oracle
  void (*ref_qx)(const View&, const sf::Problem&);  // act='int8' oracle; nullptr: the format has no int8 mode
  void (*ref_fx)(const View&, const sf::Problem&);  // the fixed-point walk's oracle; nullptr: the format has none
};

// <name>_linear(x, W..., bias, y, isa, algo, check_indices, act) and its _ref (isa, algo ignored),
// and <name>_check(W..., rows, cols)
template <class View, class... W, size_t... I>
void def_i8(nb::module_& m, const I8Format<View, W...>& f, std::index_sequence<I...>) {
  for (const bool ref : {false, true}) {
    const std::string op = std::string(f.name) + "_linear" + (ref ? "_ref" : "");
    m.def(op.c_str(),
          [ref, op, f](const In& x, const W&... w, const nb::object& bias, const Out& y, const std::string& isa,
                       const std::string& algo, bool check_indices, const std::string& act) {
            const sf::Problem p = problem(x, bias, y);
            const View v = f.view(w..., p.in, op, check_indices);
            expect_rows(v.w.rows, p.out, op.c_str());
            const sf::Isa i = ref ? sf::Isa::scalar : resolve(isa);
            const int a = parse_algo(algo);
            const sf::I8Act ac = parse_act(act);
            if (ac == sf::I8Act::int8 && f.ref_qx == nullptr)
              throw std::invalid_argument(op + " has no int8-activation mode; use act='float'");
            nb::gil_scoped_release rel;
            if (!ref) f.fast(v, p, i, a, ac);
            else if (ac == sf::I8Act::int8) f.ref_qx(v, p);
            else f.ref(v, p);
          },
          "x"_a, nb::arg(f.args[I])..., "bias"_a.none(), "y"_a, "isa"_a = "", "algo"_a = "auto",
          "check_indices"_a = true, "act"_a = "float");
  }
  if (f.ref_fx != nullptr) {  // <name>_linear_fx_ref(x, W..., bias, y, check_indices): int8.h's fixed-point walk
    const std::string op = std::string(f.name) + "_linear_fx_ref";
    m.def(op.c_str(),
          [op, f](const In& x, const W&... w, const nb::object& bias, const Out& y, bool check_indices) {
            const sf::Problem p = problem(x, bias, y);
            const View v = f.view(w..., p.in, op, check_indices);
            expect_rows(v.w.rows, p.out, op.c_str());
            nb::gil_scoped_release rel;
            f.ref_fx(v, p);
          },
          "x"_a, nb::arg(f.args[I])..., "bias"_a.none(), "y"_a, "check_indices"_a = true);
  }
  const std::string check = std::string(f.name) + "_check";
  m.def(check.c_str(), [check, f](const W&... w, int64_t rows, int64_t cols) {
    expect_rows(f.view(w..., cols, check, true).w.rows, rows, check.c_str());
  }, nb::arg(f.args[I])..., "rows"_a, "cols"_a);
}

template <class View, class... W>
void def_i8(nb::module_& m, const I8Format<View, W...>& f) {
  def_i8(m, f, std::index_sequence_for<W...>{});
}

// int8 values with float32 row scales (csrc/int8.h): forward only
void register_int8(nb::module_& m) {
  def_i8(m, I8Format<sf::CsrI8, In, In, In, In>{
      "csr_i8", {"row_ptr", "col", "values", "scales"},
      [](const In& rp, const In& col, const In& val, const In& sc, int64_t cols, const std::string& op, bool chk) {
        return sf::csr_i8_view(array(rp, "row_ptr"), array(col, "col"), array(val, "values"), array(sc, "scales"),
                               cols, op.c_str(), chk);
      },
      [](const sf::CsrI8& w, const sf::Problem& p, sf::Isa i, int a, sf::I8Act) { sf::csr_i8_linear(w, p, i, a); },
      sf::csr_i8_linear_ref, nullptr, nullptr});
  def_i8(m, I8Format<sf::BitmapI8, In, In, In, In>{
      "bitmap_i8", {"bitmap", "row_offsets", "values", "scales"},
      [](const In& bits, const In& ro, const In& val, const In& sc, int64_t cols, const std::string& op, bool chk) {
        return sf::bitmap_i8_view(array(bits, "bitmap"), array(ro, "row_offsets"), array(val, "values"),
                                  array(sc, "scales"), cols, op.c_str(), chk);
      },
      sf::bitmap_i8_linear, sf::bitmap_i8_linear_ref, sf::bitmap_i8_linear_qx_ref, sf::bitmap_i8_linear_fx_ref});
  def_i8(m, I8Format<sf::NmI8, In, In, In, int, int>{
      "nm_i8", {"values", "indices", "scales", "n", "m"},
      [](const In& val, const In& idx, const In& sc, const int& n, const int& mm, int64_t cols, const std::string& op,
         bool chk) {
        return sf::nm_i8_view(array(val, "values"), array(idx, "indices"), array(sc, "scales"), n, mm, cols,
                              op.c_str(), chk);
      },
      sf::nm_i8_linear, sf::nm_i8_linear_ref, sf::nm_i8_linear_qx_ref, sf::nm_i8_linear_fx_ref});
  m.def("int8_act_path", [](const std::string& isa) { return std::string(sf::int8_act_path(resolve(isa))); },
        "isa"_a = "", "The int8-activation product a call on this ISA path runs (csrc/int8.h int8_act_path).");
  m.def("int8_float_walk",
        [](const std::string& isa, int n, int mm) { return std::string(sf::int8_float_walk(resolve(isa), n, mm)); },
        "isa"_a = "", "n"_a = 0, "m"_a = 0,
        "The walk a float32-activation int8 call at batch 1-3 takes on this ISA path for a bitmap weight (n = m = 0) "
        "or an n:m one: 'fixed_x' or 'fma' (csrc/int8.h int8_float_walk; SPARSEFORGE_INT8_WALK=fma forces 'fma').");
  m.def("int8_vnni", [] { return sf::use_int8_vnni(); },
        "Whether act='int8' runs the AVX512 VNNI / VBMI / VBMI2 kernels on the avx512 path (SPARSEFORGE_INT8_VNNI).");
}

}  // namespace

void register_sparse_linear(nb::module_& m) {
  register_csr(m);
  register_bitmap(m);
  register_nm(m);
  register_fanin(m);
  register_bsr(m);
  register_int8(m);
}

}  // namespace sfb
