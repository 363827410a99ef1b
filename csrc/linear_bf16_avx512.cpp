// bf16 panel product with AVX512_BF16 vdpbf16ps (linear_bf16.h); decoders with AVX512_VBMI2.
#include "linear_bf16_kernels.h"

namespace sf {
namespace {

// acc[4 rows][NB batch vectors] += panel rows (weight pairs broadcast) . packed x
struct DpMicro {
  template <int NB>
  static void rows4(const uint16_t* panel, const Bf16Tile& t, int64_t c0, int64_t kc, float* acc, int64_t i0, int64_t bt0) {
    const int64_t kph = t.kp / 2;
    __m512 a[4][NB];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) a[r][j] = _mm512_loadu_ps(acc + (i0 + r) * kBf16BatchChunk + (bt0 + j) * 16);
    const uint32_t* xb = t.xp + (bt0 * kph + c0 / 2) * 16;
    const uint16_t* wr = panel + i0 * kBf16PanelLd;
    for (int64_t k = 0; k < kc / 2; ++k) {  // fully unrolled inside: 16 accumulators stay in registers
      __m512bh xv[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) xv[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + (j * kph + k) * 16));
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        uint32_t pair;
        std::memcpy(&pair, wr + r * kBf16PanelLd + 2 * k, 4);
        const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) a[r][j] = _mm512_dpbf16_ps(a[r][j], wv, xv[j]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) _mm512_storeu_ps(acc + (i0 + r) * kBf16BatchChunk + (bt0 + j) * 16, a[r][j]);
  }
  void mul(const uint16_t* panel, const Bf16Tile& t, int64_t c0, int64_t kc, float* acc) const {
    for (int64_t i0 = 0; i0 < kBf16RowBlock; i0 += 4) {
      int64_t bt = 0;
      for (; bt + 4 <= t.nbt; bt += 4) rows4<4>(panel, t, c0, kc, acc, i0, bt);
      switch (t.nbt - bt) {
        case 3: rows4<3>(panel, t, c0, kc, acc, i0, bt); break;
        case 2: rows4<2>(panel, t, c0, kc, acc, i0, bt); break;
        case 1: rows4<1>(panel, t, c0, kc, acc, i0, bt); break;
        default: break;
      }
    }
  }
};

}  // namespace

namespace avx512bf16 {
extern const Bf16Kernels linear_bf16 = Bf16Table<PanelBlock<DpMicro>>::kTable;
}  // namespace avx512bf16
}  // namespace sf
