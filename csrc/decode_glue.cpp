// Decode-layer glue (decode_glue.h): the portable kernels, run-time dispatch, the scalar oracles and rope_kv.
#include "decode_glue.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "decode_glue_kernels.h"

namespace sf {

namespace scalar {
SF_DEFINE_GLUE_KERNELS
}  // namespace scalar

namespace {

const GlueKernels& glue_for(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return avx512::glue_kernels;
  if (isa == Isa::avx2) return avx2::glue_kernels;
#endif
  (void)isa;
  return scalar::glue_kernels;
}

}  // namespace

void rms_norm(float* h, const float* residual, const float* weight, int64_t rows, int64_t n, float eps, float* out, Isa isa) {
  glue_for(isa).rms_norm(h, residual, weight, rows, n, eps, out);
}

void swiglu(const float* gate_up, int64_t rows, int64_t f, float* out, Isa isa) {
  glue_for(isa).swiglu(gate_up, rows, f, out);
}

void rms_norm_ref(float* h, const float* residual, const float* weight, int64_t rows, int64_t n, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float* hr = h + r * n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (residual) hr[i] += residual[r * n + i];
      ss += static_cast<double>(hr[i]) * hr[i];
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) out[r * n + i] = weight[i] * (hr[i] * inv);
  }
}

void swiglu_ref(const float* gate_up, int64_t rows, int64_t f, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < f; ++i) {
      const double g = gate_up[r * 2 * f + i], u = gate_up[r * 2 * f + f + i];
      out[r * f + i] = static_cast<float>(g / (1.0 + std::exp(-g)) * u);
    }
  }
}

void rope_kv(const RopeKvProblem& p) {
  if (p.Hq < 1 || p.Hkv < 1 || p.D < 2 || p.D % 2 != 0) {
    throw std::invalid_argument("rope_kv needs Hq >= 1, Hkv >= 1 and an even head size D >= 2; got Hq=" +
                                std::to_string(p.Hq) + " Hkv=" + std::to_string(p.Hkv) + " D=" + std::to_string(p.D));
  }
  if (p.pos < 0 || p.pos >= p.cap) {
    throw std::invalid_argument("rope_kv position " + std::to_string(p.pos) + " is outside the cache [0, " +
                                std::to_string(p.cap) + ")");
  }
  const int64_t D = p.D, half = D / 2;
  // one head: out[i] = x[i] cos[i] + x[i +- half] ssin[i], two rounded products and a rounded sum
  auto rotate = [&](const float* x, float* out) {
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i] * p.cos[i], b = x[i + half] * p.ssin[i];
      const float c = x[i + half] * p.cos[i + half], d = x[i] * p.ssin[i + half];
      out[i] = a + b;
      out[i + half] = c + d;
    }
  };
  for (int64_t h = 0; h < p.Hq; ++h) rotate(p.qkv + h * D, p.q_out + h * D);
  const float* kin = p.qkv + p.Hq * D;
  const float* vin = kin + p.Hkv * D;
  for (int64_t h = 0; h < p.Hkv; ++h) {
    float* krow = p.k + (h * p.cap + p.pos) * D;
    rotate(kin + h * D, krow);
    std::memcpy(p.v + (h * p.cap + p.pos) * D, vin + h * D, static_cast<size_t>(D) * sizeof(float));
  }
}

}  // namespace sf
