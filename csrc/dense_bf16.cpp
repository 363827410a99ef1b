// Dense bf16 GEMV (dense_bf16.h): scalar reference, portable kernel, run-time dispatch and the driver
// that splits the output rows over the thread pool.
#include "dense_bf16.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "dense_bf16_kernels.h"
#include "isa.h"
#include "linear_bf16.h"
#include "threadpool.h"

namespace sf {

namespace scalar {
extern const DenseBf16DotsFn dense_bf16_dots = dense_bf16_dots_impl;
}  // namespace scalar

namespace {

constexpr int64_t kMaxTaskRows = 64;  // output rows per task (at in = 2048: 256 KB of weights)

void widen_plain(const uint16_t* x, int64_t in, float* xf) {
  for (int64_t i = 0; i < in; ++i) xf[i] = bf16_to_f32_d(x[i]);
}

struct Kernel {
  DenseBf16DotsFn dots;
  const char* name;
  DenseBf16WidenFn widen;  // x to float32 in the kernel's layout; null: the kernel reads x as bf16
};

Kernel kernel(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
#if defined(SF_HAVE_BF16_KERNELS)
  if (isa == Isa::avx512 && use_avx512_bf16()) return {avx512bf16::dense_bf16_dots, "avx512_bf16", nullptr};
#endif
  if (isa == Isa::avx512) return {avx512::dense_bf16_dots, "avx512", widen_plain};
  if (isa == Isa::avx2) return {avx2::dense_bf16_dots, "avx2", avx2::dense_bf16_widen};
#endif
  (void)isa;
  return {scalar::dense_bf16_dots, "scalar", widen_plain};
}

void check(const DenseBf16Problem& p) {
  if (p.out < 0 || p.in < 0 || p.B < 0) {
    throw std::invalid_argument("dense bf16 GEMV: negative size (out=" + std::to_string(p.out) + ", in=" +
                                std::to_string(p.in) + ", B=" + std::to_string(p.B) + ")");
  }
  if ((p.y32 == nullptr) == (p.y16 == nullptr)) throw std::invalid_argument("dense bf16 GEMV: give exactly one of y32, y16");
  if (p.out * p.in > 0 && (p.w == nullptr || (p.B > 0 && p.x == nullptr))) {
    throw std::invalid_argument("dense bf16 GEMV: null weight or x");
  }
}

// y[b, r0 + i] for i < n from the dots: + bias, stored as float32 or rounded to bf16
void store(const DenseBf16Problem& p, int64_t b, int64_t r0, int64_t n, const float* dots) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = dots[i] + (p.bias ? p.bias[r0 + i] : 0.f);
    if (p.y32) p.y32[b * p.out + r0 + i] = v;
    else p.y16[b * p.out + r0 + i] = f32_to_bf16(v);
  }
}

}  // namespace

const char* dense_bf16_kernel_name(Isa isa) { return kernel(isa).name; }

const char* dense_bf16_gemv(const DenseBf16Problem& p, Isa isa) {
  check(p);
  const Kernel k = kernel(isa);
  if (p.B == 0 || p.out == 0) return k.name;
  std::vector<float> xf;
  if (k.widen) {  // widened once per call (exact)
    xf.resize(static_cast<size_t>(p.B * p.in));
    for (int64_t b = 0; b < p.B; ++b) k.widen(p.x + b * p.in, p.in, xf.data() + b * p.in);
  }
  // rows per task: a multiple of the kernels' row group, at most kMaxTaskRows, ~4 tasks per thread at least
  const int64_t per_thread = (p.out + 4 * num_threads() - 1) / (4 * num_threads());
  const int64_t rows = max64(kDenseBf16Rows, min64(kMaxTaskRows, (per_thread + kDenseBf16Rows - 1) / kDenseBf16Rows * kDenseBf16Rows));
  const int64_t ntasks = (p.out + rows - 1) / rows;
  parallel_for(ntasks, [&](int64_t t, int) {
    const int64_t r0 = t * rows, n = min64(rows, p.out - r0);
    float dots[kMaxTaskRows];
    for (int64_t b = 0; b < p.B; ++b) {  // the task's rows stay in L2 for the next batch row
      k.dots(p.w + r0 * p.in, p.in, p.x + b * p.in, k.widen ? xf.data() + b * p.in : nullptr, n, dots);
      store(p, b, r0, n, dots);
    }
  });
  return k.name;
}

void dense_bf16_gemv_ref(const DenseBf16Problem& p) {
  check(p);
  std::vector<float> dots(static_cast<size_t>(p.out));
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t r = 0; r < p.out; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < p.in; ++k) s += bf16_to_f32_d(p.w[r * p.in + k]) * bf16_to_f32_d(p.x[b * p.in + k]);
      dots[r] = s;
    }
    store(p, b, 0, p.out, dots.data());
  }
}

}  // namespace sf
