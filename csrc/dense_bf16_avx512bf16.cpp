// Dense bf16 GEMV with AVX512_BF16 (dense_bf16.h): vdpbf16ps multiplies 32 bf16 of a weight row with
// 32 bf16 of x and adds the pairs into 16 float32 lanes (both products are exact in float32). R rows
// at a time (kDenseBf16Rows, then 4, then 1), one accumulator per row, each row prefetched
// kDenseBf16PrefetchBytes ahead; the last partial step uses masked loads (zeros past `in`).
// Each row's arithmetic is the same whatever R is, so the thread split does not change results.
#include <immintrin.h>

#include "dense_bf16.h"

namespace sf {
namespace {

template <int R>
void dots_rows(const uint16_t* W, int64_t in, const uint16_t* xb, float* dots) {
  const int64_t kv = in - in % 32;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kv; k += 32) {
    const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + k));
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(W + r * in + k) + kDenseBf16PrefetchBytes, _MM_HINT_T0);
      acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(_mm512_loadu_si512(W + r * in + k)), xv);
    }
  }
  if (kv < in) {
    const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << (in - kv)) - 1);
    const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, xb + kv));
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, W + r * in + kv)), xv);
  }
  for (int r = 0; r < R; ++r) dots[r] = _mm512_reduce_add_ps(acc[r]);
}

void dots_impl(const uint16_t* W, int64_t in, const uint16_t* xb, const float*, int64_t nrows, float* dots) {
  int64_t i = 0;
  for (; i + kDenseBf16Rows <= nrows; i += kDenseBf16Rows) dots_rows<kDenseBf16Rows>(W + i * in, in, xb, dots + i);
  for (; i + 4 <= nrows; i += 4) dots_rows<4>(W + i * in, in, xb, dots + i);
  for (; i < nrows; ++i) dots_rows<1>(W + i * in, in, xb, dots + i);
}

}  // namespace

namespace avx512bf16 {
extern const DenseBf16DotsFn dense_bf16_dots = dots_impl;
}  // namespace avx512bf16
}  // namespace sf
