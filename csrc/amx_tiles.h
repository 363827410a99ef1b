// The AMX tile configuration of the AMX kernels (linear_bf16_amx.cpp, column_sparse_bf16_amx.cpp,
// prefill_attention_amx.cpp): palette 1, tiles 0-7 all 16 rows x 64 bytes, loaded by the constructor
// and released by the destructor (one object per task or per tile call, on the thread that runs the
// tile instructions). Include only from files compiled with -mamx-tile; the process must hold the
// Linux tile permission (bf16_path_supported in linear_bf16.h requests it).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace sf {
namespace {

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

class AmxTiles16x64 {
 public:
  AmxTiles16x64() {
    AmxTileConfig cfg;
    for (int i = 0; i < 8; ++i) {
      cfg.colsb[i] = 64;
      cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
  }
  ~AmxTiles16x64() { _tile_release(); }
  AmxTiles16x64(const AmxTiles16x64&) = delete;
  AmxTiles16x64& operator=(const AmxTiles16x64&) = delete;
};

}  // namespace
}  // namespace sf
