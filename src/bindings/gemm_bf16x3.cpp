// Binding of the bf16x3 GEMM (csrc/gemm_bf16x3.h):
//   bf16x3_pack_a(src, hi, lo)    src float32 (M, K), any strides -> packed A parts (uint16, 1-D,
//                                 round32(M) * round32(K) elements each)
//   bf16x3_pack_b(src, hi, lo)    src float32 (K, N), any strides -> packed B parts
//   bf16x3_split(src, hi, lo)     element-wise split of a C-contiguous float32 array into bf16 bits
//   bf16x3_gemm(a_hi, a_lo, b_hi, b_lo, M, N, K, c, accumulate, path)
//                                 c (M, N) float32 with unit column stride (row stride free): c = A @ B
//                                 (or c += A @ B); path "" / "auto" / "amx" / "scalar"; park_workers: the
//                                 pool's workers sleep right after the product (else they poll ~0.2 ms)
//   bf16x3_path_supported(name), bf16x3_best_path()
#include <stdexcept>
#include <string>

#include "binding.h"
#include "gemm_bf16x3.h"

namespace sfb {

using namespace nb::literals;

namespace {

using Strided = nb::ndarray<nb::ro, nb::device::cpu>;
using StridedOut = nb::ndarray<nb::device::cpu>;

sf::Bf16x3Path parse_path(const std::string& name) {
  if (name.empty() || name == "auto") return sf::best_bf16x3_path();
  sf::Bf16x3Path p;
  if (name == "amx") {
    p = sf::Bf16x3Path::amx;
  } else if (name == "scalar") {
    p = sf::Bf16x3Path::scalar;
  } else {
    raise_config_error("bf16x3 path '" + name + "' is unknown; use 'auto', 'amx' or 'scalar'");
  }
  if (!sf::bf16x3_path_supported(p)) {
    raise_config_error("bf16x3 path 'amx' needs AMX-BF16 (CPU, kernel permission and a build with -mamx-bf16); "
                       "this machine lacks it: use matmul_precision='fp32'");
  }
  return p;
}

void check_src(const Strided& a, const char* name) {
  if (a.dtype() != nb::dtype<float>() || a.ndim() != 2) {
    throw std::invalid_argument(std::string(name) + " must be a 2-D float32 array");
  }
}

uint16_t* parts(const StridedOut& a, int64_t need, const char* name) {
  if (a.dtype() != nb::dtype<uint16_t>() || a.ndim() != 1 || static_cast<int64_t>(a.shape(0)) < need ||
      (a.shape(0) > 1 && a.stride(0) != 1)) {
    throw std::invalid_argument(std::string(name) + " must be a contiguous 1-D uint16 array of at least " +
                                std::to_string(need) + " elements");
  }
  return static_cast<uint16_t*>(a.data());
}

const uint16_t* parts_in(const Strided& a, int64_t need, const char* name) {
  if (a.dtype() != nb::dtype<uint16_t>() || a.ndim() != 1 || static_cast<int64_t>(a.shape(0)) < need ||
      (a.shape(0) > 1 && a.stride(0) != 1)) {
    throw std::invalid_argument(std::string(name) + " must be a contiguous 1-D uint16 array of at least " +
                                std::to_string(need) + " elements (packed for these sizes)");
  }
  return static_cast<const uint16_t*>(a.data());
}

template <class Pack>
void pack(const Strided& src, const StridedOut& hi, const StridedOut& lo, Pack&& fn) {
  check_src(src, "src");
  const int64_t r = static_cast<int64_t>(src.shape(0)), c = static_cast<int64_t>(src.shape(1));
  const int64_t need = sf::x3_round(r) * sf::x3_round(c);
  uint16_t* h = parts(hi, need, "hi");
  uint16_t* l = parts(lo, need, "lo");
  const float* p = static_cast<const float*>(src.data());
  const int64_t rs = src.stride(0), cs = src.stride(1);
  threads();
  nb::gil_scoped_release rel;
  fn(p, r, c, rs, cs, h, l);
}

}  // namespace

void register_gemm_bf16x3(nb::module_& m) {
  m.def("bf16x3_pack_a", [](const Strided& src, const StridedOut& hi, const StridedOut& lo) {
    pack(src, hi, lo, [](const float* p, int64_t r, int64_t c, int64_t rs, int64_t cs, uint16_t* h, uint16_t* l) {
      sf::bf16x3_pack_a(p, r, c, rs, cs, h, l);
    });
  }, "src"_a, "hi"_a, "lo"_a);
  m.def("bf16x3_pack_b", [](const Strided& src, const StridedOut& hi, const StridedOut& lo) {
    pack(src, hi, lo, [](const float* p, int64_t r, int64_t c, int64_t rs, int64_t cs, uint16_t* h, uint16_t* l) {
      sf::bf16x3_pack_b(p, r, c, rs, cs, h, l);
    });
  }, "src"_a, "hi"_a, "lo"_a);
  m.def("bf16x3_split", [](const In& src, const Out& hi, const Out& lo) {
    if (src.dtype() != nb::dtype<float>()) throw std::invalid_argument("src must be float32");
    const int64_t n = static_cast<int64_t>(src.size());
    if (hi.dtype() != nb::dtype<uint16_t>() || lo.dtype() != nb::dtype<uint16_t>() ||
        static_cast<int64_t>(hi.size()) != n || static_cast<int64_t>(lo.size()) != n) {
      throw std::invalid_argument("hi and lo must be uint16 arrays with src's number of elements");
    }
    nb::gil_scoped_release rel;
    sf::bf16x3_split(static_cast<const float*>(src.data()), n, static_cast<uint16_t*>(hi.data()),
                     static_cast<uint16_t*>(lo.data()));
  }, "src"_a, "hi"_a, "lo"_a);
  m.def("bf16x3_gemm", [](const Strided& a_hi, const Strided& a_lo, const Strided& b_hi, const Strided& b_lo,
                          int64_t M, int64_t N, int64_t K, const StridedOut& c, bool accumulate, const std::string& path,
                          bool park_workers) {
    if (M < 0 || N < 0 || K < 0) throw std::invalid_argument("M, N, K must be >= 0");
    const int64_t na = sf::x3_round(M) * sf::x3_round(K), nbn = sf::x3_round(K) * sf::x3_round(N);
    if (c.dtype() != nb::dtype<float>() || c.ndim() != 2 || static_cast<int64_t>(c.shape(0)) != M ||
        static_cast<int64_t>(c.shape(1)) != N || (N > 1 && c.stride(1) != 1) || (M > 1 && c.stride(0) < N)) {
      throw std::invalid_argument("c must be a float32 (M, N) array with unit column stride");
    }
    sf::Bf16x3Gemm g;
    g.a_hi = parts_in(a_hi, na, "a_hi");
    g.a_lo = parts_in(a_lo, na, "a_lo");
    g.b_hi = parts_in(b_hi, nbn, "b_hi");
    g.b_lo = parts_in(b_lo, nbn, "b_lo");
    g.M = M;
    g.N = N;
    g.K = K;
    g.c = static_cast<float*>(c.data());
    g.ldc = M > 1 ? c.stride(0) : N;
    g.accumulate = accumulate;
    const sf::Bf16x3Path p = parse_path(path);
    threads();
    nb::gil_scoped_release rel;
    sf::bf16x3_gemm(g, p, true, park_workers ? sf::AfterJob::park : sf::AfterJob::spin);
  }, "a_hi"_a, "a_lo"_a, "b_hi"_a, "b_lo"_a, "M"_a, "N"_a, "K"_a, "c"_a, "accumulate"_a = false, "path"_a = "",
     "park_workers"_a = false);
  m.def("bf16x3_path_supported", [](const std::string& name) {
    if (name == "amx") return sf::bf16x3_path_supported(sf::Bf16x3Path::amx);
    if (name == "scalar") return true;
    raise_config_error("bf16x3 path '" + name + "' is unknown; use 'amx' or 'scalar'");
  }, "name"_a);
  m.def("bf16x3_best_path", []() {
    return std::string(sf::best_bf16x3_path() == sf::Bf16x3Path::amx ? "amx" : "scalar");
  });
}

}  // namespace sfb
