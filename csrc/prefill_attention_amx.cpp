// bf16-compute prefill-attention tile with AMX-BF16 (prefill_attention_bf16_kernels.h).
//
// Tiles (palette 1, all 16 rows x 64 bytes): 0-3 float32 C blocks of 32 rows x 32 columns (0: rows
// 0-15 x columns 0-15, 1: rows 0-15 x 16-31, 2 / 3: rows 16-31), 4 / 5 the A rows 0-15 / 16-31 (16
// rows x 32 bf16 of one k step), 6 / 7 the B pairs of columns 0-15 / 16-31 (16 pair rows x 16
// columns); configured per tile call (amx_tiles.h).
#include "amx_tiles.h"
#include "prefill_attention_bf16_kernels.h"

namespace sf {
namespace {

struct AmxMicro {
  AmxTiles16x64 tiles;  // the configuration, loaded per tile call and released after it

  // rows rounded up to 16 rows of C are written; A must hold them
  void gemm(const uint16_t* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
            int64_t cols, int64_t kpairs, bool add) const {
    const long sa = lda * 2, sb = ldb * 4, sc = ldc * 4;  // tile row strides in bytes
    const int64_t rt = (rows + 15) / 16, ct = cols / 16, ks = kpairs / 16;
    for (int64_t i = 0; i < rt; i += 2) {
      const bool two_rows = i + 1 < rt;
      const uint16_t* a0 = A + i * 16 * lda;
      const uint16_t* a1 = a0 + 16 * lda;
      for (int64_t j = 0; j < ct; j += 2) {
        const bool two_cols = j + 1 < ct;
        float* c00 = C + i * 16 * ldc + j * 16;
        float* c10 = c00 + 16 * ldc;
        if (add) {
          _tile_loadd(0, c00, sc);
          if (two_cols) _tile_loadd(1, c00 + 16, sc);
          if (two_rows) _tile_loadd(2, c10, sc);
          if (two_rows && two_cols) _tile_loadd(3, c10 + 16, sc);
        } else {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        }
        const uint32_t* b = B + j * 16;
        for (int64_t k = 0; k < ks; ++k) {
          _tile_loadd(4, a0 + k * 32, sa);
          _tile_loadd(6, b + k * 16 * ldb, sb);
          _tile_dpbf16ps(0, 4, 6);
          if (two_cols) {
            _tile_loadd(7, b + k * 16 * ldb + 16, sb);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (two_rows) {
            _tile_loadd(5, a1 + k * 32, sa);
            _tile_dpbf16ps(2, 5, 6);
            if (two_cols) _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c00, sc);
        if (two_cols) _tile_stored(1, c00 + 16, sc);
        if (two_rows) _tile_stored(2, c10, sc);
        if (two_rows && two_cols) _tile_stored(3, c10 + 16, sc);
      }
    }
  }
};

}  // namespace

namespace amx {
extern const PrefillBf16TileFn prefill_tile_bf16_compute = prefill_tile_bf16_impl<AmxMicro>;
}  // namespace amx
}  // namespace sf
