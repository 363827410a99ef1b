// bf16 column-sparse product with AVX512_BF16 vdpbf16ps (column_sparse_bf16.h); decoder with AVX512_VBMI2.
#include "column_sparse_bf16_kernels.h"

namespace sf {
namespace {

// acc[8 rows][32 outputs] += per channel pair: the rows' x pair broadcast . the panel's weight pairs
// (16 accumulators in registers; the panel is read once per 8 rows)
struct ColDpMicro {
  template <class Side>
  void mul(const uint16_t* panel, const ColBf16Tile& t, int64_t k0, int64_t kc, float* acc, Side&&) const {
    constexpr int R = 8, V = 2;
    for (int64_t og = 0; og < kColBf16Outs; og += 16 * V) {
      for (int64_t b0 = 0; b0 < t.nbt * 16; b0 += R) {
        __m512 a[R][V];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
          for (int v = 0; v < V; ++v) a[r][v] = _mm512_loadu_ps(acc + (b0 + r) * kColBf16Outs + og + 16 * v);
        const uint16_t* xr = t.xa + b0 * t.ldx + k0;
        for (int64_t q = 0; q < kc / 2; ++q) {
          const uint16_t* prow = panel + q * 2 * kColBf16Outs + 2 * og;
          __m512bh wv[V];
#pragma GCC unroll 2
          for (int v = 0; v < V; ++v) wv[v] = reinterpret_cast<__m512bh>(_mm512_load_si512(prow + 32 * v));
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            uint32_t pair;
            std::memcpy(&pair, xr + r * t.ldx + 2 * q, 4);
            const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
#pragma GCC unroll 2
            for (int v = 0; v < V; ++v) a[r][v] = _mm512_dpbf16_ps(a[r][v], xv, wv[v]);
          }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
          for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + (b0 + r) * kColBf16Outs + og + 16 * v, a[r][v]);
      }
    }
  }
};

}  // namespace

namespace avx512bf16 {
extern const ColumnSparseBf16Kernels column_sparse_bf16 = ColBf16Table<ColDpMicro>::kTable;
}  // namespace avx512bf16
}  // namespace sf
