// The AMX tile configuration of the AMX kernels (linear_bf16_amx.cpp, column_sparse_bf16_amx.cpp,
// prefill_attention_amx.cpp, gemm_bf16x3_amx.cpp): palette 1, tiles 0-7 all 16 rows x 64 bytes,
// loaded by the constructor and released by the destructor (one object per task or per tile call,
// on the thread that runs the tile instructions). Include only from files compiled with -mamx-tile; the process must hold the
// Linux tile permission (bf16_path_supported in linear_bf16.h requests it).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace sf {
namespace {

// palette 1; tiles 0-7: 64 bytes per row (colsb, little-endian uint16 at bytes 16-31), 16 rows (bytes
// 48-55). A constant table: GCC's _tile_loadconfig declares a read of 8 bytes only, so stores into a
// local configuration may be moved past it or dropped.
alignas(64) constexpr uint8_t kAmxTiles16x64Config[64] = {
    1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0};

class AmxTiles16x64 {
 public:
  AmxTiles16x64() { _tile_loadconfig(kAmxTiles16x64Config); }
  ~AmxTiles16x64() { _tile_release(); }
  AmxTiles16x64(const AmxTiles16x64&) = delete;
  AmxTiles16x64& operator=(const AmxTiles16x64&) = delete;
};

}  // namespace
}  // namespace sf
