// Binding of the decode-layer glue (csrc/decode_glue.h) over raw buffers, float32 or bfloat16 (raw uint16 bits), all
// C-contiguous on the CPU, one dtype per call (except q and to_bf16's src, always float32):
//   rms_norm(h, weight, eps, out, residual=None, isa="")   h (rows, n), updated in place (h += residual) when
//                                                          residual (rows, n) is given; weight (n,); out (rows, n)
//                                                          (may be h itself)
//   rms_norm_ref(h, weight, eps, out, residual=None)        the scalar oracle
//   swiglu(gate_up, out, isa="")                            gate_up (rows, 2f), out (rows, f) = silu(gate) * up
//   swiglu_ref(gate_up, out)
//   rope_kv(qkv, cos, ssin, heads, q, k, v, pos)            qkv (1, (heads + 2 Hkv) D); cos / ssin (cap, D), row pos
//                                                          used; q (1, heads, D) float32 written; k / v (1, Hkv, cap, D):
//                                                          token pos written
//   to_bf16(src, out)                                       out = src (float32) rounded to bfloat16 bits, same shape
// The calls run on the caller's thread and keep the GIL: they take microseconds at decode sizes.
// Bad input (and an unknown isa) raises ValueError naming the argument; an ISA this CPU lacks raises ConfigError.
#include <stdexcept>
#include <string>

#include "binding.h"
#include "decode_glue.h"

namespace sfb {

using namespace nb::literals;

namespace {

// float32, or bfloat16 as raw uint16 bits
sf::VT glue_type(const nb::dlpack::dtype& t, const char* name) {
  if (t == nb::dtype<float>()) return sf::VT::f32;
  if (t == nb::dtype<uint16_t>()) return sf::VT::bf16;
  throw std::invalid_argument(std::string(name) + " must be float32 or bfloat16 (raw uint16 bits)");
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

template <class A>
void same_type(const A& a, const char* name, sf::VT vt, const char* ref = "h") {
  if (glue_type(a.dtype(), name) != vt) throw std::invalid_argument(std::string(name) + " must have " + ref + "'s dtype");
}

struct NormArgs {
  sf::VT vt;
  void* h;
  const void* residual;
  const void* weight;
  int64_t rows, n;
  float eps;
  void* out;
};

NormArgs norm_args(const Out& h, const In& weight, double eps, const Out& out, const nb::object& residual) {
  check_out(h, "h", 2);
  const sf::VT vt = glue_type(h.dtype(), "h");
  const int64_t rows = extent(h, 0), n = extent(h, 1);
  if (n < 1) throw std::invalid_argument("h must have at least one column");
  check_array(weight, "weight", 1);
  same_type(weight, "weight", vt);
  if (dim(weight, 0) != n) throw std::invalid_argument("weight must have h's " + std::to_string(n) + " columns");
  check_out(out, "out", 2);
  same_type(out, "out", vt);
  same_shape(out, "out", rows, n);
  if (!(eps >= 0.0)) throw std::invalid_argument("eps must be >= 0, got " + std::to_string(eps));
  const void* rp = nullptr;
  if (!residual.is_none()) {
    const In r = nb::cast<In>(residual);
    check_array(r, "residual", 2);
    same_type(r, "residual", vt);
    same_shape(r, "residual", rows, n);
    rp = r.data();
    if (rp == h.data() || rp == out.data()) throw std::invalid_argument("residual must not be h or out");
  }
  return {vt, h.data(), rp, weight.data(), rows, n, static_cast<float>(eps), out.data()};
}

template <class F32, class Bf16>
void run_norm(const NormArgs& a, F32&& f32, Bf16&& bf16) {
  if (a.vt == sf::VT::f32) {
    f32(static_cast<float*>(a.h), static_cast<const float*>(a.residual), static_cast<const float*>(a.weight), a.rows, a.n,
        a.eps, static_cast<float*>(a.out));
  } else {
    bf16(static_cast<uint16_t*>(a.h), static_cast<const uint16_t*>(a.residual), static_cast<const uint16_t*>(a.weight),
         a.rows, a.n, a.eps, static_cast<uint16_t*>(a.out));
  }
}

struct SwigluArgs {
  sf::VT vt;
  const void* gate_up;
  int64_t rows, f;
  void* out;
};

SwigluArgs swiglu_args(const In& gate_up, const Out& out) {
  check_array(gate_up, "gate_up", 2);
  const sf::VT vt = glue_type(gate_up.dtype(), "gate_up");
  if (dim(gate_up, 1) % 2 != 0) throw std::invalid_argument("gate_up must have an even number of columns [gate | up]");
  check_out(out, "out", 2);
  if (glue_type(out.dtype(), "out") != vt) throw std::invalid_argument("out must have gate_up's dtype");
  same_shape(out, "out", dim(gate_up, 0), dim(gate_up, 1) / 2);
  return {vt, gate_up.data(), dim(gate_up, 0), dim(gate_up, 1) / 2, out.data()};
}

template <class F32, class Bf16>
void run_swiglu(const SwigluArgs& a, F32&& f32, Bf16&& bf16) {
  if (a.vt == sf::VT::f32) {
    f32(static_cast<const float*>(a.gate_up), a.rows, a.f, static_cast<float*>(a.out));
  } else {
    bf16(static_cast<const uint16_t*>(a.gate_up), a.rows, a.f, static_cast<uint16_t*>(a.out));
  }
}

}  // namespace

void register_decode_glue(nb::module_& m) {
  m.def("rms_norm", [](const Out& h, const In& weight, double eps, const Out& out, const nb::object& residual,
                       const std::string& isa) {
    const sf::Isa path = resolve(isa);
    run_norm(norm_args(h, weight, eps, out, residual),
             [&](auto... a) { sf::rms_norm(a..., path); }, [&](auto... a) { sf::rms_norm_bf16(a..., path); });
  }, "h"_a, "weight"_a, "eps"_a, "out"_a, "residual"_a = nb::none(), "isa"_a = "");
  m.def("rms_norm_ref", [](const Out& h, const In& weight, double eps, const Out& out, const nb::object& residual) {
    run_norm(norm_args(h, weight, eps, out, residual),
             [](auto... a) { sf::rms_norm_ref(a...); }, [](auto... a) { sf::rms_norm_bf16_ref(a...); });
  }, "h"_a, "weight"_a, "eps"_a, "out"_a, "residual"_a = nb::none());
  m.def("swiglu", [](const In& gate_up, const Out& out, const std::string& isa) {
    const sf::Isa path = resolve(isa);
    run_swiglu(swiglu_args(gate_up, out), [&](auto... a) { sf::swiglu(a..., path); },
               [&](auto... a) { sf::swiglu_bf16(a..., path); });
  }, "gate_up"_a, "out"_a, "isa"_a = "");
  m.def("swiglu_ref", [](const In& gate_up, const Out& out) {
    run_swiglu(swiglu_args(gate_up, out), [](auto... a) { sf::swiglu_ref(a...); },
               [](auto... a) { sf::swiglu_bf16_ref(a...); });
  }, "gate_up"_a, "out"_a);
  m.def("to_bf16", [](const In& src, const Out& out) {
    check_f32(src, "src", src.ndim());
    check_out(out, "out", src.ndim());
    if (out.dtype() != nb::dtype<uint16_t>()) throw std::invalid_argument("out must be bfloat16 (raw uint16 bits)");
    for (size_t d = 0; d < src.ndim(); ++d) {
      if (src.shape(d) != out.shape(d)) throw std::invalid_argument("out must have src's shape");
    }
    sf::to_bf16(static_cast<const float*>(src.data()), static_cast<int64_t>(src.size()), static_cast<uint16_t*>(out.data()));
  }, "src"_a, "out"_a);
  m.def("rope_kv", [](const In& qkv, const In& cos, const In& ssin, int64_t heads, const Out& q, const Out& k,
                      const Out& v, int64_t pos) {
    check_array(qkv, "qkv", 2);
    check_array(cos, "cos", 2);
    check_array(ssin, "ssin", 2);
    check_out(q, "q", 3);
    check_out(k, "k", 4);
    check_out(v, "v", 4);
    sf::RopeKvProblem p;
    p.vt = glue_type(qkv.dtype(), "qkv");
    same_type(cos, "cos", p.vt, "qkv");
    same_type(ssin, "ssin", p.vt, "qkv");
    same_type(k, "k", p.vt, "qkv");
    same_type(v, "v", p.vt, "qkv");
    if (q.dtype() != nb::dtype<float>()) throw std::invalid_argument("q must be float32");
    p.q_out = static_cast<float*>(q.data());
    p.k = k.data();
    p.v = v.data();
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
    const int64_t bytes = p.vt == sf::VT::f32 ? 4 : 2;
    p.qkv = qkv.data();
    p.cos = static_cast<const char*>(cos.data()) + pos * p.D * bytes;
    p.ssin = static_cast<const char*>(ssin.data()) + pos * p.D * bytes;
    sf::rope_kv(p);
  }, "qkv"_a, "cos"_a, "ssin"_a, "heads"_a, "q"_a, "k"_a, "v"_a, "pos"_a);
}

}  // namespace sfb
