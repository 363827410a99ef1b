// bf16 product on AMX (TDPBF16PS) (linear_bf16.h); decoders with AVX512_VBMI2.
//
// Per group of up to kBf16AmxGroup 32-row blocks and per column block (bf16_amx_col_block: all of x, or
// a slice that stays in L2 across the group): each block's rows are decoded one after the other into a
// dense bf16 strip (each row's stored values and index bits are read sequentially), then the strip is
// multiplied with the packed activations while the accumulators stay in tiles across the strip; between
// column blocks they wait in scratch. Tiles (palette 1, all 16 rows x 64 bytes): 0-3 the float32
// accumulators of 32 weight rows x 32 batch rows (0: rows 0-15 x batch tile bt, 1: rows 16-31 x bt,
// 2 / 3: the same x bt + 1), 4 / 5 strip rows 0-15 / 16-31 (A: 16 rows x 32 bf16), 6 / 7 packed x of
// batch tiles bt / bt + 1 (B: 16 column pairs x 16 batch lanes). The configuration is loaded per run of
// blocks and released after it.
#include <immintrin.h>

#include "amx_tiles.h"
#include "linear_bf16_kernels.h"

namespace sf {
namespace {

// Byte ranges to bring into L2 a few lines at a time, spread over a multiply (the next block's row
// segments: 2 ranges per row).
class SpanPrefetch {
 public:
  void add(const void* p, int64_t bytes) {
    if (n_ < kMax && bytes >= 0) {
      p_[n_] = static_cast<const char*>(p);
      end_[n_] = p_[n_] + bytes + 1;  // at least the first line, as prefetch_span
      lines_ += (bytes + 64) / 64;
      ++n_;
    }
  }
  int64_t lines() const { return lines_; }
  void issue(int64_t lines) {
    for (; lines > 0 && i_ < n_; --lines) {
      _mm_prefetch(p_[i_], _MM_HINT_T1);
      p_[i_] += 64;
      if (p_[i_] >= end_[i_]) ++i_;
    }
  }

 private:
  static constexpr int kMax = 2 * kBf16RowBlock;
  const char* p_[kMax];
  const char* end_[kMax];
  int n_ = 0, i_ = 0;
  int64_t lines_ = 0;
};

struct AmxStripBlock {
  template <class Panel>
  static void run(const typename Panel::View& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* scratch) {
    const Panel dec(w);
    AmxTiles16x64 tiles;  // the configuration, for the whole run
    constexpr int64_t kGroupRows = kBf16AmxGroup * kBf16RowBlock;
    for (int64_t g = r0; g < r1; g += kGroupRows) group(dec, t, g, min64(r1, g + kGroupRows), scratch);
  }

  // rows [r0, r1): at most kBf16AmxGroup blocks of 32
  template <class Panel>
  static void group(const Panel& dec, const Bf16Tile& t, int64_t r0, int64_t r1, void* scratch) {
    const int64_t nrows = r1 - r0, nb = (nrows + kBf16RowBlock - 1) / kBf16RowBlock;
    const int64_t kb = bf16_amx_col_block(t.kp), ld = kb + 32;  // strip columns, row stride (not a multiple of 1 KB)
    uint16_t* strip = static_cast<uint16_t*>(scratch);           // [32][ld]
    float* acc = reinterpret_cast<float*>(static_cast<char*>(scratch) + kBf16RowBlock * ld * 2);  // [nb][32][64]
    int64_t* cur = reinterpret_cast<int64_t*>(reinterpret_cast<char*>(acc) + kBf16AmxGroup * kBf16AccBytes);  // [nrows]
    for (int64_t i = 0; i < nrows; ++i) cur[i] = dec.start(r0 + i);
    const bool segments = kb < t.kp;  // rows read in segments: prefetch the next block's
    for (int64_t c0 = 0; c0 < t.kp; c0 += kb) {
      const int64_t kc = min64(kb, t.kp - c0);
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t b0 = r0 + j * kBf16RowBlock, nr = min64(kBf16RowBlock, r1 - b0);
        for (int64_t i = 0; i < nr; ++i) dec.row(b0 + i, cur[j * kBf16RowBlock + i], c0, kc, strip + i * ld);
        for (int64_t i = nr; i < kBf16RowBlock; ++i) std::memset(strip + i * ld, 0, static_cast<size_t>(kc) * 2);
        SpanPrefetch next;
        if (segments) {  // block j + 1 of this column block, or block 0 of the next
          const int64_t jn = j + 1 < nb ? j + 1 : 0, cn = j + 1 < nb ? c0 : c0 + kb;
          if (cn < t.kp) {
            const int64_t bn = r0 + jn * kBf16RowBlock, kcn = min64(kb, t.kp - cn);
            for (int64_t i = 0; i < min64(kBf16RowBlock, r1 - bn); ++i) {
              dec.spans(bn + i, cur[jn * kBf16RowBlock + i], cn, kcn, [&](const void* p, int64_t bytes) { next.add(p, bytes); });
            }
          }
        }
        float* a = acc + j * kBf16RowBlock * kBf16BatchChunk;
        multiply(strip, ld, t, c0, kc, a, next);
        if (c0 + kc >= t.kp) store_y(a, t, b0, nr);
      }
    }
    if (t.kp == 0) {
      std::memset(acc, 0, kBf16AccBytes);
      for (int64_t j = 0; j < nb; ++j) store_y(acc, t, r0 + j * kBf16RowBlock, min64(kBf16RowBlock, r1 - r0 - j * kBf16RowBlock));
    }
  }

  // acc [32][64] (+)= strip [32][c0 .. c0 + kc) . x (the tiles start from zero at c0 == 0), issuing the
  // prefetches of `next` evenly over the steps
  static void multiply(const uint16_t* strip, int64_t ld, const Bf16Tile& t, int64_t c0, int64_t kc, float* acc,
                       SpanPrefetch& next) {
    constexpr long kAccStride = kBf16BatchChunk * 4, kXStride = 64;
    const long sstride = static_cast<long>(ld * 2);
    const int64_t kph = t.kp / 2;
    const uint16_t* s1 = strip + 16 * ld;
    const int64_t steps = (t.nbt + 1) / 2 * (kc / 32);
    const int64_t per_step = steps > 0 ? (next.lines() + steps - 1) / steps : 0;
    for (int64_t bt = 0; bt < t.nbt; bt += 2) {
      float* a0 = acc + bt * 16;
      float* a1 = a0 + 16 * kBf16BatchChunk;
      const uint32_t* x0 = t.xp + (bt * kph + c0 / 2) * 16;
      if (bt + 1 < t.nbt) {
        const uint32_t* x1 = x0 + kph * 16;
        if (c0 == 0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, a0, kAccStride);
          _tile_loadd(1, a1, kAccStride);
          _tile_loadd(2, a0 + 16, kAccStride);
          _tile_loadd(3, a1 + 16, kAccStride);
        }
        for (int64_t s = 0; s < kc; s += 32) {
          _tile_loadd(4, strip + s, sstride);
          _tile_loadd(5, s1 + s, sstride);
          _tile_loadd(6, x0 + s * 8, kXStride);
          _tile_loadd(7, x1 + s * 8, kXStride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 5, 6);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
          next.issue(per_step);
        }
        _tile_stored(0, a0, kAccStride);
        _tile_stored(1, a1, kAccStride);
        _tile_stored(2, a0 + 16, kAccStride);
        _tile_stored(3, a1 + 16, kAccStride);
      } else {
        if (c0 == 0) {
          _tile_zero(0);
          _tile_zero(1);
        } else {
          _tile_loadd(0, a0, kAccStride);
          _tile_loadd(1, a1, kAccStride);
        }
        for (int64_t s = 0; s < kc; s += 32) {
          _tile_loadd(4, strip + s, sstride);
          _tile_loadd(5, s1 + s, sstride);
          _tile_loadd(6, x0 + s * 8, kXStride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 5, 6);
          next.issue(per_step);
        }
        _tile_stored(0, a0, kAccStride);
        _tile_stored(1, a1, kAccStride);
      }
    }
  }
};

}  // namespace

namespace amx {
extern const Bf16Kernels linear_bf16 = Bf16Table<AmxStripBlock>::kTable;
}  // namespace amx
}  // namespace sf
