// Binding of the few-token expert FFN (csrc/expert_gemv.h): x (T, d), experts (T, k) int64,
// weights (T, k), w_up / w_gate (E, d, h), w_down (E, h, d), all float32; y (T, d) overwritten.
// "expert_ffn" runs the dispatched kernel, "expert_ffn_ref" the oracle; park_workers: the pool's
// workers sleep right after the kernel (true) or poll for the next kernel call (false). Expert ids outside
// [-1, E) are rejected by the kernel's own check before anything is read.
#include <stdexcept>
#include <string>

#include "binding.h"
#include "expert_gemv.h"

namespace sfb {

using namespace nb::literals;

namespace {

sf::Act parse_act(const std::string& a) {
  if (a == "silu") return sf::Act::silu;
  if (a == "gelu") return sf::Act::gelu;
  if (a == "gelu_tanh") return sf::Act::gelu_tanh;
  if (a == "relu") return sf::Act::relu;
  throw std::invalid_argument("activation='" + a + "' must be 'silu', 'gelu', 'gelu_tanh' or 'relu'");
}

// x (T, d) and the expert weights into p (sizes, pointers), checked: w_up (E, d, h), w_down (E, h, d),
// w_gate None or w_up's shape; y (T, d) float32 (the caller has checked its kind)
void expert_operands(sf::ExpertFfnProblem& p, const In& x, const In& w_up, const In& w_down, const nb::object& w_gate,
                     const Out& y, const std::string& act) {
  check_f32(x, "x", 2);
  check_f32(w_up, "w_up", 3);
  check_f32(w_down, "w_down", 3);
  p.T = dim(x, 0);
  p.d = dim(x, 1);
  p.E = dim(w_up, 0);
  p.h = dim(w_up, 2);
  if (dim(w_up, 1) != p.d || dim(w_down, 0) != p.E || dim(w_down, 1) != p.h || dim(w_down, 2) != p.d) {
    throw std::invalid_argument("expert weights must be w_up (E, d, h) and w_down (E, h, d) with d = x.shape[1]");
  }
  if (static_cast<int64_t>(y.shape(0)) != p.T || static_cast<int64_t>(y.shape(1)) != p.d) {
    throw std::invalid_argument("y must have the shape of x");
  }
  if (!w_gate.is_none()) {
    In g = nb::cast<In>(w_gate);
    check_f32(g, "w_gate", 3);
    if (dim(g, 0) != p.E || dim(g, 1) != p.d || dim(g, 2) != p.h) throw std::invalid_argument("w_gate must have w_up's shape");
    p.w_gate = static_cast<const float*>(g.data());
  }
  p.x = static_cast<const float*>(x.data());
  p.w_up = static_cast<const float*>(w_up.data());
  p.w_down = static_cast<const float*>(w_down.data());
  p.y = static_cast<float*>(y.data());
  p.act = parse_act(act);
}

void expert_ffn_call(const In& x, const In& experts, const In& weights, const In& w_up, const In& w_down,
                     const nb::object& w_gate, const Out& y, const std::string& act, const std::string& isa,
                     int64_t block_floats, bool parallel, bool park, bool ref) {
  check_array(experts, "experts", 2);
  if (experts.dtype() != nb::dtype<int64_t>()) throw std::invalid_argument("experts must be int64");
  check_f32(weights, "weights", 2);
  check_out(y, "y", 2);
  if (y.dtype() != nb::dtype<float>()) throw std::invalid_argument("y must be float32");
  sf::ExpertFfnProblem p;
  expert_operands(p, x, w_up, w_down, w_gate, y, act);
  p.k = dim(experts, 1);
  if (dim(experts, 0) != p.T || dim(weights, 0) != p.T || dim(weights, 1) != p.k) {
    throw std::invalid_argument("experts and weights must both have shape (T, k) with T = x.shape[0]");
  }
  p.experts = static_cast<const int64_t*>(experts.data());
  p.weights = static_cast<const float*>(weights.data());
  if (ref) {
    nb::gil_scoped_release rel;
    sf::expert_ffn_ref(p);
    return;
  }
  const sf::Isa i = resolve(isa);
  threads();  // a bad SPARSEFORGE_NUM_THREADS is a ConfigError here, not inside the kernel
  nb::gil_scoped_release rel;
  sf::expert_ffn(p, i, block_floats, parallel, park ? sf::AfterJob::park : sf::AfterJob::spin);
}

}  // namespace

// y (T, N) = x (T, d) @ w^T for w (N, d), float32, on the calling thread (the decode router).
void few_token_linear_call(const In& x, const In& w, const Out& y, const std::string& isa, bool ref) {
  check_f32(x, "x", 2);
  check_f32(w, "weight", 2);
  check_out(y, "y", 2);
  if (y.dtype() != nb::dtype<float>()) throw std::invalid_argument("y must be float32");
  const int64_t T = dim(x, 0), d = dim(x, 1), N = dim(w, 0);
  if (dim(w, 1) != d) throw std::invalid_argument("weight must be (N, d) with d = x.shape[1]");
  if (static_cast<int64_t>(y.shape(0)) != T || static_cast<int64_t>(y.shape(1)) != N) {
    throw std::invalid_argument("y must be (x.shape[0], weight.shape[0])");
  }
  const auto* xp = static_cast<const float*>(x.data());
  const auto* wp = static_cast<const float*>(w.data());
  auto* yp = static_cast<float*>(y.data());
  if (ref) {
    sf::few_token_linear_ref(xp, T, d, wp, N, yp);
    return;
  }
  const sf::Isa i = resolve(isa);
  sf::few_token_linear(xp, T, d, wp, N, yp, i);
}

// The fused decode step (csrc/expert_gemv.h expert_decode_step): x (T, d), router (E, d), expert
// weights as expert_ffn; outputs y (T, d), logits / probs (T, E), experts (T, k) int64, weights
// (T, k), counts (E,) int64, all C-contiguous, overwritten.
void decode_step_call(const In& x, const In& router, const In& w_up, const In& w_down, const nb::object& w_gate,
                      bool renormalize, const Out& y, const Out& logits, const Out& probs, const Out& experts,
                      const Out& weights, const Out& counts, const std::string& act, bool parallel, bool park) {
  check_f32(router, "router", 2);
  auto shaped = [](const Out& a, const char* name, int64_t r, int64_t c, bool i64) {
    check_out(a, name, c < 0 ? 1 : 2);
    if (a.dtype() != (i64 ? nb::dtype<int64_t>() : nb::dtype<float>()) || static_cast<int64_t>(a.shape(0)) != r ||
        (c >= 0 && static_cast<int64_t>(a.shape(1)) != c)) {
      throw std::invalid_argument(std::string(name) + " has the wrong dtype or shape");
    }
  };
  check_out(y, "y", 2);
  if (y.dtype() != nb::dtype<float>()) throw std::invalid_argument("y must be float32");
  sf::ExpertFfnProblem p;
  expert_operands(p, x, w_up, w_down, w_gate, y, act);
  p.k = static_cast<int64_t>(experts.ndim() == 2 ? experts.shape(1) : 0);
  shaped(logits, "logits", p.T, p.E, false);
  shaped(probs, "probs", p.T, p.E, false);
  shaped(experts, "experts", p.T, p.k, true);
  shaped(weights, "weights", p.T, p.k, false);
  shaped(counts, "counts", p.E, -1, true);
  if (dim(router, 0) != p.E || dim(router, 1) != p.d) throw std::invalid_argument("router must be (E, d)");
  sf::DecodeRouting r;
  r.router = static_cast<const float*>(router.data());
  r.renormalize = renormalize;
  r.logits = static_cast<float*>(logits.data());
  r.probs = static_cast<float*>(probs.data());
  r.experts = static_cast<int64_t*>(experts.data());
  r.weights = static_cast<float*>(weights.data());
  r.counts = static_cast<int64_t*>(counts.data());
  const sf::Isa i = resolve("");
  threads();
  nb::gil_scoped_release rel;
  sf::expert_decode_step(p, r, i, 0, parallel, park ? sf::AfterJob::park : sf::AfterJob::spin);
}

void register_expert_ffn(nb::module_& m) {
  m.def("expert_decode_step", &decode_step_call, "x"_a, "router"_a, "w_up"_a, "w_down"_a, "w_gate"_a.none(),
        "renormalize"_a, "y"_a, "logits"_a, "probs"_a, "experts"_a, "weights"_a, "counts"_a, "activation"_a = "silu",
        "parallel"_a = true, "park_workers"_a = true);
  for (const bool ref : {false, true}) {
    m.def(ref ? "few_token_linear_ref" : "few_token_linear",
          [ref](const In& x, const In& w, const Out& y, const std::string& isa) { few_token_linear_call(x, w, y, isa, ref); },
          "x"_a, "weight"_a, "y"_a, "isa"_a = "");
  }
  for (const bool ref : {false, true}) {
    m.def(ref ? "expert_ffn_ref" : "expert_ffn",
          [ref](const In& x, const In& experts, const In& weights, const In& w_up, const In& w_down,
                const nb::object& w_gate, const Out& y, const std::string& activation, const std::string& isa,
                int64_t block_floats, bool parallel, bool park_workers) {
            expert_ffn_call(x, experts, weights, w_up, w_down, w_gate, y, activation, isa, block_floats, parallel,
                            park_workers, ref);
          },
          "x"_a, "experts"_a, "weights"_a, "w_up"_a, "w_down"_a, "w_gate"_a.none(), "y"_a, "activation"_a = "silu",
          "isa"_a = "", "block_floats"_a = 0, "parallel"_a = true, "park_workers"_a = true);
  }
}

}  // namespace sfb
