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

void rms_norm_bf16(uint16_t* h, const uint16_t* residual, const uint16_t* weight, int64_t rows, int64_t n, float eps,
                   uint16_t* out, Isa isa) {
  glue_for(isa).rms_norm_bf16(h, residual, weight, rows, n, eps, out);
}

void swiglu_bf16(const uint16_t* gate_up, int64_t rows, int64_t f, uint16_t* out, Isa isa) {
  glue_for(isa).swiglu_bf16(gate_up, rows, f, out);
}

void to_bf16(const float* src, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_round(src[i]);
}

void rms_norm_bf16_ref(uint16_t* h, const uint16_t* residual, const uint16_t* weight, int64_t rows, int64_t n, float eps,
                       uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* hr = h + r * n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (residual) hr[i] = bf16_round(bf16_float(hr[i]) + bf16_float(residual[r * n + i]));
      ss += static_cast<double>(bf16_float(hr[i])) * bf16_float(hr[i]);
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) {
      out[r * n + i] = bf16_round(bf16_float(weight[i]) * bf16_float(bf16_round(bf16_float(hr[i]) * inv)));
    }
  }
}

void swiglu_bf16_ref(const uint16_t* gate_up, int64_t rows, int64_t f, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < f; ++i) {
      const double g = bf16_float(gate_up[r * 2 * f + i]);
      const float s = bf16_float(bf16_round(static_cast<float>(g / (1.0 + std::exp(-g)))));
      out[r * f + i] = bf16_round(s * bf16_float(gate_up[r * 2 * f + f + i]));
    }
  }
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

namespace {

// rope_kv over element type T: load widens to float32, round rounds back to T (identity for float32). One head:
// out[i] = round(round(x[i] cos[i]) + round(x[i +- half] ssin[i])), two products and a sum, each rounded
template <class T, class Load, class Round>
void rope_heads(const RopeKvProblem& p, Load&& load, Round&& round) {
  const int64_t D = p.D, half = D / 2;
  const T* qkv = static_cast<const T*>(p.qkv);
  const T* cs = static_cast<const T*>(p.cos);
  const T* sn = static_cast<const T*>(p.ssin);
  auto rotated = [&](const T* x, int64_t i, int64_t other) {
    const T a = round(load(x[i]) * load(cs[i])), b = round(load(x[other]) * load(sn[i]));
    return round(load(a) + load(b));
  };
  for (int64_t h = 0; h < p.Hq; ++h) {
    const T* x = qkv + h * D;
    float* q = p.q_out + h * D;
    for (int64_t i = 0; i < half; ++i) {
      q[i] = load(rotated(x, i, i + half));
      q[i + half] = load(rotated(x, i + half, i));
    }
  }
  const T* kin = qkv + p.Hq * D;
  const T* vin = kin + p.Hkv * D;
  for (int64_t h = 0; h < p.Hkv; ++h) {
    T* krow = static_cast<T*>(p.k) + (h * p.cap + p.pos) * D;
    const T* x = kin + h * D;
    for (int64_t i = 0; i < half; ++i) {
      krow[i] = rotated(x, i, i + half);
      krow[i + half] = rotated(x, i + half, i);
    }
    std::memcpy(static_cast<T*>(p.v) + (h * p.cap + p.pos) * D, vin + h * D, static_cast<size_t>(D) * sizeof(T));
  }
}

}  // namespace

void rope_kv(const RopeKvProblem& p) {
  if (p.Hq < 1 || p.Hkv < 1 || p.D < 2 || p.D % 2 != 0) {
    throw std::invalid_argument("rope_kv needs Hq >= 1, Hkv >= 1 and an even head size D >= 2; got Hq=" +
                                std::to_string(p.Hq) + " Hkv=" + std::to_string(p.Hkv) + " D=" + std::to_string(p.D));
  }
  if (p.pos < 0 || p.pos >= p.cap) {
    throw std::invalid_argument("rope_kv position " + std::to_string(p.pos) + " is outside the cache [0, " +
                                std::to_string(p.cap) + ")");
  }
  if (p.vt == VT::f32) {
    rope_heads<float>(p, [](float v) { return v; }, [](float v) { return v; });
  } else if (p.vt == VT::bf16) {
    rope_heads<uint16_t>(p, bf16_float, bf16_round);
  } else {
    throw std::invalid_argument("rope_kv takes float32 or bfloat16 buffers");
  }
}

}  // namespace sf
