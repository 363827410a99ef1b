// BSR kernels, written once with the vector type of the including file (lanes.h: zmm in
// bsr_avx512.cpp, ymm in bsr_avx2.cpp, SSE in bsr.cpp); everything has internal linkage.
//
// rows (batch 1-3): a dense h x w micro-kernel per block: the x segment of the block is read once
//   per batch row and multiplied with the block's h contiguous value rows, kVL columns per vector
//   op (a scalar tail when w is not a multiple of kVL).
// lanes / lanes_t: the generic batch-in-lanes kernels over BsrDec.
// sddmm: per block, dw[b, i, jj] = dot(dyt[R*h + i], xt[C*w + jj]) over the batch lanes.
#pragma once

#include "bsr.h"
#include "lanes.h"
#include "sddmm.h"

namespace sf {
namespace {

typedef float vflu __attribute__((vector_size(kVL * 4), aligned(4)));  // unaligned load / store

template <VT V>
inline vfl load_vals(const void* v, int64_t q) {
  if constexpr (V == VT::f32) {
    return *reinterpret_cast<const vflu*>(static_cast<const float*>(v) + q);
  } else {
    vfl out;
    const uint16_t* h = static_cast<const uint16_t*>(v) + q;
    for (int l = 0; l < kVL; ++l) out[l] = bf16_to_f32(h[l]);
    return out;
  }
}

template <VT V>
void bsr_rows_v(const BsrView& w, const Problem& p, int64_t r0, int64_t r1) {
  const int64_t wv = w.w - w.w % kVL;  // columns of a block handled by vectors
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t R = r / w.h, i = r % w.h;
    const float bv = p.bias ? p.bias[r] : 0.f;
    for (int64_t bt = 0; bt < p.B; ++bt) {
      const float* xb = p.x + bt * p.in;
      vfl acc = {};
      float tail = 0.f;
      for (int64_t b = w.brp[R]; b < w.brp[R + 1]; ++b) {
        const float* xs = xb + w.block_col(b) * w.w;
        const int64_t q0 = (b * w.h + i) * w.w;
        for (int64_t jj = 0; jj < wv; jj += kVL)
          acc += load_vals<V>(w.val, q0 + jj) * *reinterpret_cast<const vflu*>(xs + jj);
        for (int64_t jj = wv; jj < w.w; ++jj) tail += load_val<V>(w.val, q0 + jj) * xs[jj];
      }
      p.y[bt * p.out + r] = hsum_vfl(acc) + tail + bv;
    }
  }
}

void bsr_rows(const BsrView& w, const Problem& p, int64_t r0, int64_t r1) {
  if (w.vt == VT::f32) bsr_rows_v<VT::f32>(w, p, r0, r1); else bsr_rows_v<VT::bf16>(w, p, r0, r1);
}

void bsr_lanes(const BsrView& w, const Problem& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* ybuf) {
  with_bsr_dec(w, [&](const auto& dec) { lanes_rows(dec, p, lp, r0, r1, ybuf); });
}

void bsr_lanes_t(const BsrView& w, const ProblemT& p, const LanesPlan& lp, int64_t r0, int64_t r1, float* dxt) {
  with_bsr_dec(w, [&](const auto& dec) { lanes_t_rows(dec, p, lp, r0, r1, dxt); });
}

template <int NV>
void bsr_sddmm_tile(const BsrView& w, const float* xt, const float* dyt, float* dw, bool add, int64_t R0, int64_t R1) {
  constexpr int64_t W = 16 * NV;
  constexpr int NQ = static_cast<int>(W / kVL);
  for (int64_t R = R0; R < R1; ++R) {
    for (int64_t b = w.brp[R]; b < w.brp[R + 1]; ++b) {
      const float* xb = xt + w.block_col(b) * w.w * W;
      for (int64_t i = 0; i < w.h; ++i) {
        const vfl* d = reinterpret_cast<const vfl*>(dyt + (R * w.h + i) * W);
        float* out = dw + (b * w.h + i) * w.w;
        for (int64_t jj = 0; jj < w.w; ++jj) {
          const vfl* xr = reinterpret_cast<const vfl*>(xb + jj * W);
          vfl a = d[0] * xr[0];
          for (int q = 1; q < NQ; ++q) a += d[q] * xr[q];
          const float s = hsum_vfl(a);
          out[jj] = add ? out[jj] + s : s;
        }
      }
    }
  }
}

// dw of the blocks of rows [r0, r1) (the driver splits on rows; blocks belong to block rows, so
// only block rows starting in [r0, r1) are done here: tasks are aligned to h by bsr_sddmm)
void bsr_sddmm(const BsrView& w, const ProblemW& p, const LanesPlan& xp, const LanesPlan& dp, int64_t r0, int64_t r1) {
  const int64_t R0 = (r0 + w.h - 1) / w.h, R1 = (r1 + w.h - 1) / w.h;
  for (int64_t t = 0; t < xp.ntiles; ++t) {
    const int64_t bn = min64(kLaneTile, p.B - t * kLaneTile);
    const float* xt = xp.xt + t * xp.tile_stride;
    const float* dyt = dp.xt + t * dp.tile_stride;
    switch ((bn + 15) / 16) {
      case 1: bsr_sddmm_tile<1>(w, xt, dyt, p.dw, t > 0, R0, R1); break;
      case 2: bsr_sddmm_tile<2>(w, xt, dyt, p.dw, t > 0, R0, R1); break;
      case 3: bsr_sddmm_tile<3>(w, xt, dyt, p.dw, t > 0, R0, R1); break;
      default: bsr_sddmm_tile<4>(w, xt, dyt, p.dw, t > 0, R0, R1); break;
    }
  }
}

}  // namespace
}  // namespace sf
