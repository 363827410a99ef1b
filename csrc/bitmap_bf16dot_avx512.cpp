// The bitmap bf16-values batch-1 walk of bitmap_bf16dot.h (AVX512_BF16 + AVX512_VBMI2).
#include <immintrin.h>

#include <cstring>

#include "bitmap_bf16dot.h"
#include "isa.h"

namespace sf {
namespace {

constexpr int64_t kAheadBytes = 1024;  // values prefetched this far ahead of the walk

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// kSteps 32-column steps per iteration, each into its own accumulator.
constexpr int kSteps = 4;

// One row's walk state: its bitmap, its next stored value and kSteps accumulators.
struct Bf16Row {
  const uint8_t* bits;
  const uint16_t* v;
  __m512 acc[kSteps];
};

inline Bf16Row start_row(const BitmapView& w, int64_t r) {
  Bf16Row s{w.bits + r * w.bpr, static_cast<const uint16_t*>(w.val) + w.row_offsets[r], {}};
  for (int k = 0; k < kSteps; ++k) s.acc[k] = _mm512_setzero_ps();
  return s;
}

// columns [c, c + 32 * kSteps) of one row
inline void step_row(Bf16Row& s, const uint16_t* xb, int64_t c) {
  _mm_prefetch(reinterpret_cast<const char*>(s.v) + kAheadBytes, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(s.v) + kAheadBytes + 64, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(s.bits + c / 8) + 256, _MM_HINT_T0);
  uint32_t m[kSteps];
  std::memcpy(m, s.bits + c / 8, sizeof m);
  for (int k = 0; k < kSteps; ++k) {
    // the mask register loaded from memory (a load, not a move from a general register on port 5);
    // the expand-load reads the popcount(mask) values it places, nothing past them
    const __mmask32 mk = _load_mask32(reinterpret_cast<__mmask32*>(const_cast<uint8_t*>(s.bits + c / 8 + 4 * k)));
    const __m512i wk = _mm512_maskz_expandloadu_epi16(mk, s.v);
    s.v += __builtin_popcount(m[k]);
    s.acc[k] = _mm512_dpbf16_ps(s.acc[k], as_bh(wk), as_bh(_mm512_loadu_si512(xb + c + 32 * k)));
  }
}

// the last < 128 columns (bitmap bytes inside the row only), then y[r]
inline void finish_row(Bf16Row& s, const BitmapView& w, const uint16_t* xb, const float* bias, float* y, int64_t r,
                       int64_t full) {
  for (int64_t c = full; c < w.cols; c += 32) {
    const int64_t nc = min64(32, w.cols - c);
    uint32_t mb = 0;
    std::memcpy(&mb, s.bits + c / 8, static_cast<size_t>((nc + 7) / 8));
    if (nc < 32) mb &= (uint32_t{1} << nc) - 1u;
    const __m512i w0 = _mm512_maskz_expandloadu_epi16(static_cast<__mmask32>(mb), s.v);
    s.v += __builtin_popcount(mb);
    s.acc[0] = _mm512_dpbf16_ps(s.acc[0], as_bh(w0), as_bh(_mm512_loadu_si512(xb + c)));
  }
  const __m512 sum = _mm512_add_ps(_mm512_add_ps(s.acc[0], s.acc[1]), _mm512_add_ps(s.acc[2], s.acc[3]));
  y[r] = _mm512_reduce_add_ps(sum) + (bias ? bias[r] : 0.f);
}

}  // namespace

// Rows walked in pairs (rows r and r + half side by side: two value streams in flight, as the
// float32 walks do, common.h walk_row_pairs); each row's arithmetic is the same alone or paired.
void bitmap_bf16dot_rows(const BitmapView& w, const uint16_t* xb, const float* bias, float* y, int64_t r0, int64_t r1) {
  const int64_t full = w.cols - w.cols % (32 * kSteps);
  walk_row_pairs(
      r0, r1, full, 32 * kSteps, [&](int64_t r) { return start_row(w, r); },
      [&](Bf16Row& s, int64_t c) { step_row(s, xb, c); },
      [&](Bf16Row& s, int64_t r) { finish_row(s, w, xb, bias, y, r, full); });
}

bool bitmap_bf16dot_available() { return use_avx512_bf16() && use_avx512_vbmi2(); }

}  // namespace sf
