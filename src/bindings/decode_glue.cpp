// Binding of the decode-layer glue (csrc/decode_glue.h) over raw float32 buffers, all C-contiguous on the CPU:
//   rms_norm(h, weight, eps, out, residual=None, isa="")   h (rows, n), updated in place (h += residual) when
//                                                          residual (rows, n) is given; weight (n,); out (rows, n)
//                                                          (may be h itself)
//   rms_norm_ref(h, weight, eps, out, residual=None)        the scalar oracle
//   swiglu(gate_up, out, isa="")                            gate_up (rows, 2f), out (rows, f) = silu(gate) * up
//   swiglu_ref(gate_up, out)
//   rope_kv(qkv, cos, ssin, heads, q, k, v, pos)            qkv (1, (heads + 2 Hkv) D); cos / ssin (cap, D), row pos
//                                                          used; q (1, heads, D) written; k / v (1, Hkv, cap, D):
//                                                          token pos written
// The calls run on the caller's thread and keep the GIL: they take microseconds at decode sizes.
// Bad input raises ValueError naming the argument; an unknown or unsupported isa raises ConfigError.
#include <stdexcept>
#include <string>

#include "binding.h"
#include "decode_glue.h"

namespace sfb {

using namespace nb::literals;

namespace {

float* f32_out(const Out& a, const char* name, size_t ndim) {
  check_out(a, name, ndim);
  if (a.dtype() != nb::dtype<float>()) throw std::invalid_argument(std::string(name) + " must be float32");
  return static_cast<float*>(a.data());
}

template <class A>
int64_t extent(const A& a, size_t d) {
  return static_cast<int64_t>(a.shape(d));
}

template <class A>
void same_shape(const A& a, const char* an, int64_t rows, int64_t cols) {
  if (extent(a, 0) != rows || extent(a, 1) != cols) {
    throw std::invalid_argument(std::string(an) + " must be (" + std::to_string(rows) + ", " + std::to_string(cols) +
                                "), got (" + std::to_string(extent(a, 0)) + ", " + std::to_string(extent(a, 1)) + ")");
  }
}

struct NormArgs {
  float* h;
  const float* residual;
  const float* weight;
  int64_t rows, n;
  float eps;
  float* out;
};

NormArgs norm_args(const Out& h, const In& weight, double eps, const Out& out, const nb::object& residual) {
  float* hp = f32_out(h, "h", 2);
  const int64_t rows = extent(h, 0), n = extent(h, 1);
  if (n < 1) throw std::invalid_argument("h must have at least one column");
  check_f32(weight, "weight", 1);
  if (dim(weight, 0) != n) throw std::invalid_argument("weight must have h's " + std::to_string(n) + " columns");
  float* op = f32_out(out, "out", 2);
  same_shape(out, "out", rows, n);
  if (!(eps >= 0.0)) throw std::invalid_argument("eps must be >= 0, got " + std::to_string(eps));
  const float* rp = nullptr;
  if (!residual.is_none()) {
    const In r = nb::cast<In>(residual);
    check_f32(r, "residual", 2);
    same_shape(r, "residual", rows, n);
    rp = static_cast<const float*>(r.data());
    if (rp == hp || static_cast<const void*>(rp) == static_cast<void*>(op)) {
      throw std::invalid_argument("residual must not be h or out");
    }
  }
  return {hp, rp, static_cast<const float*>(weight.data()), rows, n, static_cast<float>(eps), op};
}

void swiglu_args(const In& gate_up, const Out& out, int64_t* rows, int64_t* f, float** op) {
  check_f32(gate_up, "gate_up", 2);
  *rows = dim(gate_up, 0);
  if (dim(gate_up, 1) % 2 != 0) throw std::invalid_argument("gate_up must have an even number of columns [gate | up]");
  *f = dim(gate_up, 1) / 2;
  *op = f32_out(out, "out", 2);
  same_shape(out, "out", *rows, *f);
}

}  // namespace

void register_decode_glue(nb::module_& m) {
  m.def("rms_norm", [](const Out& h, const In& weight, double eps, const Out& out, const nb::object& residual,
                       const std::string& isa) {
    const NormArgs a = norm_args(h, weight, eps, out, residual);
    sf::rms_norm(a.h, a.residual, a.weight, a.rows, a.n, a.eps, a.out, resolve(isa));
  }, "h"_a, "weight"_a, "eps"_a, "out"_a, "residual"_a = nb::none(), "isa"_a = "");
  m.def("rms_norm_ref", [](const Out& h, const In& weight, double eps, const Out& out, const nb::object& residual) {
    const NormArgs a = norm_args(h, weight, eps, out, residual);
    sf::rms_norm_ref(a.h, a.residual, a.weight, a.rows, a.n, a.eps, a.out);
  }, "h"_a, "weight"_a, "eps"_a, "out"_a, "residual"_a = nb::none());
  m.def("swiglu", [](const In& gate_up, const Out& out, const std::string& isa) {
    int64_t rows, f;
    float* op;
    swiglu_args(gate_up, out, &rows, &f, &op);
    sf::swiglu(static_cast<const float*>(gate_up.data()), rows, f, op, resolve(isa));
  }, "gate_up"_a, "out"_a, "isa"_a = "");
  m.def("swiglu_ref", [](const In& gate_up, const Out& out) {
    int64_t rows, f;
    float* op;
    swiglu_args(gate_up, out, &rows, &f, &op);
    sf::swiglu_ref(static_cast<const float*>(gate_up.data()), rows, f, op);
  }, "gate_up"_a, "out"_a);
  m.def("rope_kv", [](const In& qkv, const In& cos, const In& ssin, int64_t heads, const Out& q, const Out& k,
                      const Out& v, int64_t pos) {
    check_f32(qkv, "qkv", 2);
    check_f32(cos, "cos", 2);
    check_f32(ssin, "ssin", 2);
    sf::RopeKvProblem p;
    p.q_out = f32_out(q, "q", 3);
    p.k = f32_out(k, "k", 4);
    p.v = f32_out(v, "v", 4);
    p.Hq = heads;
    p.Hkv = extent(k, 1);
    p.cap = extent(k, 2);
    p.D = extent(k, 3);
    p.pos = pos;
    for (size_t d = 0; d < 4; ++d) {
      if (k.shape(d) != v.shape(d)) throw std::invalid_argument("k and v must have the same shape");
    }
    if (extent(k, 0) != 1) throw std::invalid_argument("k and v must be (1, Hkv, cap, D): rope_kv writes batch 1");
    if (extent(q, 0) != 1 || extent(q, 1) != heads || extent(q, 2) != p.D) {
      throw std::invalid_argument("q must be (1, heads, D) = (1, " + std::to_string(heads) + ", " + std::to_string(p.D) + ")");
    }
    if (dim(qkv, 0) != 1 || dim(qkv, 1) != (heads + 2 * p.Hkv) * p.D) {
      throw std::invalid_argument("qkv must be (1, (heads + 2 Hkv) D) = (1, " + std::to_string((heads + 2 * p.Hkv) * p.D) + ")");
    }
    if (dim(cos, 0) != p.cap || dim(cos, 1) != p.D || dim(ssin, 0) != p.cap || dim(ssin, 1) != p.D) {
      throw std::invalid_argument("cos and ssin must be (cap, D) = (" + std::to_string(p.cap) + ", " + std::to_string(p.D) + ")");
    }
    if (pos < 0 || pos >= p.cap) {
      throw std::invalid_argument("pos " + std::to_string(pos) + " is outside the cache [0, " + std::to_string(p.cap) + ")");
    }
    p.qkv = static_cast<const float*>(qkv.data());
    p.cos = static_cast<const float*>(cos.data()) + pos * p.D;
    p.ssin = static_cast<const float*>(ssin.data()) + pos * p.D;
    sf::rope_kv(p);
  }, "qkv"_a, "cos"_a, "ssin"_a, "heads"_a, "q"_a, "k"_a, "v"_a, "pos"_a);
}

}  // namespace sfb
