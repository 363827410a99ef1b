// BSR kernels, written once with the vector type of the including file (lanes.h: zmm in
// bsr_avx512.cpp, ymm in bsr_avx2.cpp, SSE in bsr.cpp); everything has internal linkage.
//
// rows (batch 1-3): a dense h x w micro-kernel per block. Narrow blocks (w = 1, 2, 4, 8 dividing
//   the vector width, h*w a multiple of it): the whole block is a few vectors multiplied with x's w
//   columns repeated h times. Otherwise each of the block's h value rows is a contiguous dot
//   product with x's w columns, kVL columns per vector op (scalar tail past a multiple of kVL).
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

// x's WB consecutive columns repeated to fill a native vector (WB = 2, 4, 8 dividing kVL): one
// unaligned load and log2(kVL / WB) concatenating shuffles (lane stores + a wide reload would stall
// on store forwarding).
template <int S>
struct FVec {
  typedef float t __attribute__((vector_size(S * 4)));
  typedef float u __attribute__((vector_size(S * 4), aligned(4)));
};
inline FVec<4>::t cat(FVec<2>::t a) { return __builtin_shufflevector(a, a, 0, 1, 2, 3); }
#if defined(__AVX__)  // wider vectors only where they are native (no ABI change warnings)
inline FVec<8>::t cat(FVec<4>::t a) { return __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7); }
#endif
#if defined(__AVX512F__)
inline FVec<16>::t cat(FVec<8>::t a) {
  return __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
#endif
template <int S>
inline vfl grow(typename FVec<S>::t a) {
  if constexpr (S == kVL) {
    return a;
  } else {
    return grow<2 * S>(cat(a));
  }
}
template <int WB>
inline vfl repeat_cols(const float* xs) {
  if constexpr (WB == 1) {
    return vfl{} + xs[0];
  } else {
    return grow<WB>(*reinterpret_cast<const typename FVec<WB>::u*>(xs));
  }
}

constexpr int64_t kMaxGroups = 16;  // vectors of accumulators per block row in bsr_rows_narrow

// Narrow blocks (WB divides kVL, h * WB a multiple of kVL, at most kMaxGroups vectors): a whole
// block is h * WB / kVL vectors, multiplied with x's WB columns repeated h times (xr), into as many
// accumulators; lanes are summed per row once per block row.
template <VT V, int WB>
void bsr_rows_narrow(const BsrView& w, const Problem& p, int64_t r0, int64_t r1) {
  const int64_t hw = w.h * WB, ng = hw / kVL;
  for (int64_t R = r0 / w.h; R * w.h < r1; ++R) {
    for (int64_t bt = 0; bt < p.B; ++bt) {
      const float* xb = p.x + bt * p.in;
      vfl acc[kMaxGroups];
      for (int64_t g = 0; g < ng; ++g) acc[g] = vfl{};
      for (int64_t b = w.brp[R]; b < w.brp[R + 1]; ++b) {
        const float* xs = xb + w.block_col(b) * WB;
        const vfl xr = repeat_cols<WB>(xs);
        for (int64_t g = 0; g < ng; ++g) acc[g] += load_vals<V>(w.val, b * hw + g * kVL) * xr;
      }
      for (int64_t i = 0; i < w.h; ++i) {
        const int64_t r = R * w.h + i;
        if (r < r0 || r >= r1) continue;
        float s = 0.f;
        for (int64_t k = i * WB; k < (i + 1) * WB; ++k) s += acc[k / kVL][k % kVL];
        p.y[bt * p.out + r] = s + (p.bias ? p.bias[r] : 0.f);
      }
    }
  }
}

template <VT V>
void bsr_rows_t(const BsrView& w, const Problem& p, int64_t r0, int64_t r1) {
  const bool narrow = kVL % w.w == 0 && (w.h * w.w) % kVL == 0 && w.h * w.w <= kMaxGroups * kVL;
  if (narrow && w.w == 1) return bsr_rows_narrow<V, 1>(w, p, r0, r1);
  if (narrow && w.w == 2) return bsr_rows_narrow<V, 2>(w, p, r0, r1);
  if (narrow && w.w == 4) return bsr_rows_narrow<V, 4>(w, p, r0, r1);
  if constexpr (kVL >= 8) {
    if (narrow && w.w == 8) return bsr_rows_narrow<V, 8>(w, p, r0, r1);
  }
  bsr_rows_v<V>(w, p, r0, r1);  // wide blocks (w a multiple of kVL vectorises per row) and the rest
}

void bsr_rows(const BsrView& w, const Problem& p, int64_t r0, int64_t r1) {
  if (w.vt == VT::f32) bsr_rows_t<VT::f32>(w, p, r0, r1); else bsr_rows_t<VT::bf16>(w, p, r0, r1);
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
        int64_t jj = 0;
        for (; jj + 4 <= w.w; jj += 4) {  // four columns share one reduction
          const vfl* x0 = reinterpret_cast<const vfl*>(xb + jj * W);
          float s[4];
          hsum4(dot_lanes<NQ>(d, x0), dot_lanes<NQ>(d, x0 + NQ), dot_lanes<NQ>(d, x0 + 2 * NQ),
                dot_lanes<NQ>(d, x0 + 3 * NQ), s);
          for (int k = 0; k < 4; ++k) out[jj + k] = add ? out[jj + k] + s[k] : s[k];
        }
        for (; jj < w.w; ++jj) {
          const float s = hsum_vfl(dot_lanes<NQ>(d, reinterpret_cast<const vfl*>(xb + jj * W)));
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
