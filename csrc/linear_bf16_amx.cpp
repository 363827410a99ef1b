// bf16 panel product on AMX (TDPBF16PS) (linear_bf16.h); decoders with AVX512_VBMI2.
//
// Tiles (palette 1, all 16 rows x 64 bytes): 0-3 the float32 accumulators of 32 weight rows x 32
// batch rows (tile 0: rows 0-15 x batch tile bt, 1: rows 16-31 x bt, 2 / 3: the same x bt + 1),
// 4 / 5 the panel rows 0-15 / 16-31 (A: 16 rows x 32 bf16), 6 / 7 packed x of batch tiles bt / bt + 1
// (B: 16 column pairs x 16 batch lanes). The configuration is loaded per task and released after it.
#include <immintrin.h>

#include "amx_tiles.h"
#include "linear_bf16_kernels.h"

namespace sf {
namespace {

struct AmxMicro {
  AmxTiles16x64 tiles;

  // side(j) after every step of four TDPBF16PS (the tile unit is busy for ~64 cycles)
  template <class Side>
  int64_t mul(const uint16_t* panel, const Bf16Tile& t, int64_t c0, int64_t kc, float* acc, Side&& side) const {
    int64_t j = 0;
    constexpr long kAccStride = kBf16BatchChunk * 4, kPanelStride = kBf16PanelLd * 2, kXStride = 64;
    const int64_t kph = t.kp / 2;
    const uint16_t* p1 = panel + 16 * kBf16PanelLd;
    for (int64_t bt = 0; bt < t.nbt; bt += 2) {
      float* c00 = acc + bt * 16;
      float* c10 = c00 + 16 * kBf16BatchChunk;
      const uint32_t* x0 = t.xp + (bt * kph + c0 / 2) * 16;
      if (bt + 1 < t.nbt) {
        const uint32_t* x1 = x0 + kph * 16;
        _tile_loadd(0, c00, kAccStride);
        _tile_loadd(1, c10, kAccStride);
        _tile_loadd(2, c00 + 16, kAccStride);
        _tile_loadd(3, c10 + 16, kAccStride);
        for (int64_t s = 0; s < kc; s += 32) {
          _tile_loadd(4, panel + s, kPanelStride);
          _tile_loadd(5, p1 + s, kPanelStride);
          _tile_loadd(6, x0 + s * 8, kXStride);
          _tile_loadd(7, x1 + s * 8, kXStride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 5, 6);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
          side(j++);
        }
        _tile_stored(0, c00, kAccStride);
        _tile_stored(1, c10, kAccStride);
        _tile_stored(2, c00 + 16, kAccStride);
        _tile_stored(3, c10 + 16, kAccStride);
      } else {
        _tile_loadd(0, c00, kAccStride);
        _tile_loadd(1, c10, kAccStride);
        for (int64_t s = 0; s < kc; s += 32) {
          _tile_loadd(4, panel + s, kPanelStride);
          _tile_loadd(5, p1 + s, kPanelStride);
          _tile_loadd(6, x0 + s * 8, kXStride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 5, 6);
          side(j++);
        }
        _tile_stored(0, c00, kAccStride);
        _tile_stored(1, c10, kAccStride);
      }
    }
    return j;
  }
};

}  // namespace

namespace amx {
extern const Bf16Kernels linear_bf16 = Bf16Table<AmxMicro>::kTable;
}  // namespace amx
}  // namespace sf
