// bf16 product on AMX (TDPBF16PS) (linear_bf16.h); decoders with AVX512_VBMI2.
//
// Per 32-row block: the rows are decoded one after the other into a dense bf16 strip of up to
// kBf16AmxColBlock columns (each row's stored values and index bits are read sequentially, which the
// hardware prefetchers follow), then the strip is multiplied with the packed activations while the
// accumulators stay in tiles across the strip. Tiles (palette 1, all 16 rows x 64 bytes): 0-3 the
// float32 accumulators of 32 weight rows x 32 batch rows (0: rows 0-15 x batch tile bt, 1: rows 16-31
// x bt, 2 / 3: the same x bt + 1), 4 / 5 strip rows 0-15 / 16-31 (A: 16 rows x 32 bf16), 6 / 7 packed x
// of batch tiles bt / bt + 1 (B: 16 column pairs x 16 batch lanes). The configuration is loaded per
// run of blocks and released after it.
#include <immintrin.h>

#include "amx_tiles.h"
#include "linear_bf16_kernels.h"

namespace sf {
namespace {

struct AmxStripBlock {
  template <class Panel>
  static void run(const typename Panel::View& w, const Bf16Tile& t, int64_t r0, int64_t r1, void* scratch) {
    const Panel dec(w);
    AmxTiles16x64 tiles;  // the configuration, for the whole run
    for (int64_t b = r0; b < r1; b += kBf16RowBlock) {
      const int64_t e = min64(r1, b + kBf16RowBlock);
      block(dec, t, b, e, scratch);
    }
  }

  // rows [r0, r1) (at most 32)
  template <class Panel>
  static void block(const Panel& dec, const Bf16Tile& t, int64_t r0, int64_t r1, void* scratch) {
    const int64_t nr = r1 - r0;
    const int64_t kb = min64(t.kp, kBf16AmxColBlock), ld = kb + 32;  // strip columns, row stride (not a multiple of 1 KB)
    uint16_t* strip = static_cast<uint16_t*>(scratch);                   // [32][ld]
    float* acc = reinterpret_cast<float*>(static_cast<char*>(scratch) + kBf16RowBlock * ld * 2);  // [32][64]
    int64_t* cur = reinterpret_cast<int64_t*>(reinterpret_cast<char*>(acc) + kBf16AccBytes);
    for (int64_t i = 0; i < nr; ++i) cur[i] = dec.start(r0 + i);
    for (int64_t i = nr; i < kBf16RowBlock; ++i) std::memset(strip + i * ld, 0, static_cast<size_t>(kb) * 2);
    constexpr long kAccStride = kBf16BatchChunk * 4, kXStride = 64;
    const long sstride = static_cast<long>(ld * 2);
    const int64_t kph = t.kp / 2;
    const uint16_t* s1 = strip + 16 * ld;
    for (int64_t c0 = 0; c0 < t.kp; c0 += kb) {
      const int64_t kc = min64(kb, t.kp - c0);
      for (int64_t i = 0; i < nr; ++i) dec.row(r0 + i, cur[i], c0, kc, strip + i * ld);
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
          }
          _tile_stored(0, a0, kAccStride);
          _tile_stored(1, a1, kAccStride);
        }
      }
    }
    if (t.kp == 0) std::memset(acc, 0, kBf16AccBytes);
    store_y(acc, t, r0, nr);
  }
};

}  // namespace

namespace amx {
extern const Bf16Kernels linear_bf16 = Bf16Table<AmxStripBlock>::kTable;
}  // namespace amx
}  // namespace sf
