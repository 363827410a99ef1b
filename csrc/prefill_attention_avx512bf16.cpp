// bf16-compute prefill-attention tile with AVX512_BF16 vdpbf16ps (prefill_attention_bf16_kernels.h):
// a register tile of M rows x NR vectors of 16 float32 columns; each step loads NR vectors of B
// pairs and broadcasts one A pair per row.
#include "prefill_attention_bf16_kernels.h"

namespace sf {
namespace {

struct DpMicro {
  template <int M, int NR>
  static void tile(const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C, int64_t ldc, int64_t kpairs,
                   bool add) {
    __m512 c[M][NR];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) c[m][r] = add ? _mm512_loadu_ps(C + m * ldc + r * 16) : _mm512_setzero_ps();
    for (int64_t k = 0; k < kpairs; ++k) {
      __m512bh b[NR];
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) b[r] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(B + k * ldb + r * 16));
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        uint32_t pair;
        std::memcpy(&pair, A + m * lda + 2 * k, 4);
        const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) c[m][r] = _mm512_dpbf16_ps(c[m][r], a, b[r]);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) _mm512_storeu_ps(C + m * ldc + r * 16, c[m][r]);
  }

  template <int NR>
  static void rows_of(const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                      int64_t rows, int64_t kpairs, bool add) {
    constexpr int MR = 6;
    int64_t m = 0;
    for (; m + MR <= rows; m += MR) tile<MR, NR>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, kpairs, add);
    switch (rows - m) {
      case 1: tile<1, NR>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, kpairs, add); break;
      case 2: tile<2, NR>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, kpairs, add); break;
      case 3: tile<3, NR>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, kpairs, add); break;
      case 4: tile<4, NR>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, kpairs, add); break;
      case 5: tile<5, NR>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, kpairs, add); break;
      default: break;
    }
  }

  void gemm(const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
            int64_t cols, int64_t kpairs, bool add) const {
    int64_t c = 0;
    for (; c + 64 <= cols; c += 64) rows_of<4>(A, lda, B + c, ldb, C + c, ldc, rows, kpairs, add);
    for (; c + 32 <= cols; c += 32) rows_of<2>(A, lda, B + c, ldb, C + c, ldc, rows, kpairs, add);
    for (; c < cols; c += 16) rows_of<1>(A, lda, B + c, ldb, C + c, ldc, rows, kpairs, add);
  }
};

}  // namespace

namespace avx512bf16 {
extern const PrefillBf16TileFn prefill_tile_bf16_compute = prefill_tile_bf16_impl<DpMicro>;
}  // namespace avx512bf16
}  // namespace sf
