// bf16 column-sparse product on AMX (TDPBF16PS) (column_sparse_bf16.h); decoder with AVX512_VBMI2.
//
// Tiles (palette 1, all 16 rows x 64 bytes), per pass over 32 of the panel's outputs: 0-3 the
// float32 accumulators of 32 rows x 32 outputs (0: rows 0-15 x outputs 0-15, 1: rows 0-15 x
// outputs 16-31, 2 / 3: rows 16-31), 4 / 5 the
// activations of the two 16-row tiles (A: 16 rows x 32 channels), 6 / 7 the panel's output halves
// (B: 16 channel pairs x 16 outputs). The configuration is loaded per block and released after it.
#include <immintrin.h>

#include "amx_tiles.h"
#include "column_sparse_bf16_kernels.h"

namespace sf {
namespace {

struct ColAmxMicro {
  AmxTiles16x64 tiles;

  // side() after every step of four TDPBF16PS (the tile unit is busy for ~64 cycles)
  template <class Side>
  void mul(const uint16_t* panel, const ColBf16Tile& t, int64_t k0, int64_t kc, float* acc, Side&& side) const {
    constexpr long kAccStride = kColBf16Outs * 4, kPanelStride = kColBf16Outs * 2 * 2;
    const long xs = static_cast<long>(t.ldx * 2);
    for (int64_t og = 0; og < kColBf16Outs; og += 32) {  // 32 outputs: two B tiles
      const uint16_t* pg = panel + 2 * og;
      for (int64_t bt = 0; bt < t.nbt; bt += 2) {
        float* c0 = acc + bt * 16 * kColBf16Outs + og;
        const uint16_t* x0 = t.xa + bt * 16 * t.ldx + k0;
        if (bt + 1 < t.nbt) {
          float* c1 = c0 + 16 * kColBf16Outs;
          const uint16_t* x1 = x0 + 16 * t.ldx;
          _tile_loadd(0, c0, kAccStride);
          _tile_loadd(1, c0 + 16, kAccStride);
          _tile_loadd(2, c1, kAccStride);
          _tile_loadd(3, c1 + 16, kAccStride);
          for (int64_t s = 0; s < kc; s += 32) {
            const uint16_t* b = pg + s / 2 * 2 * kColBf16Outs;
            _tile_loadd(4, x0 + s, xs);
            _tile_loadd(5, x1 + s, xs);
            _tile_loadd(6, b, kPanelStride);
            _tile_loadd(7, b + 32, kPanelStride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
            side();
          }
          _tile_stored(0, c0, kAccStride);
          _tile_stored(1, c0 + 16, kAccStride);
          _tile_stored(2, c1, kAccStride);
          _tile_stored(3, c1 + 16, kAccStride);
        } else {
          _tile_loadd(0, c0, kAccStride);
          _tile_loadd(1, c0 + 16, kAccStride);
          for (int64_t s = 0; s < kc; s += 32) {
            const uint16_t* b = pg + s / 2 * 2 * kColBf16Outs;
            _tile_loadd(4, x0 + s, xs);
            _tile_loadd(6, b, kPanelStride);
            _tile_loadd(7, b + 32, kPanelStride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            side();
          }
          _tile_stored(0, c0, kAccStride);
          _tile_stored(1, c0 + 16, kAccStride);
        }
      }
    }
  }
};

}  // namespace

namespace amx {
extern const ColumnSparseBf16Kernels column_sparse_bf16 = ColBf16Table<ColAmxMicro>::kTable;
}  // namespace amx
}  // namespace sf
