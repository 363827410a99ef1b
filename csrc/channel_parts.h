// Batch-1 GEMVs over channel parts (sparse_input.cpp, column_sparse.cpp): the active channels of one
// row are cut into parts that each sweep wide column tiles (each channel's weights for a tile are one
// contiguous run; narrow tiles cut them into short runs that restart the hardware prefetchers per
// channel), then the parts' partial sums are added in order. The number of parts depends on the
// active channels only, never on the thread count, so results do not change with the threads.
#pragma once

#include <cstdint>

namespace sf {

constexpr int64_t kPartChannels = 256;  // fewest active channels in a part
constexpr int64_t kMaxParts = 4;

// parts for n active channels: 1 .. kMaxParts
inline int64_t channel_parts(int64_t n) {
  const int64_t p = n / kPartChannels;
  return p < 1 ? 1 : (p > kMaxParts ? kMaxParts : p);
}

// y[0:c] += partial[(part * ntiles + tile) * ld + j] over the parts, in order; partial is
// (parts, ntiles, ld)
inline void add_parts(float* y, const float* partial, int64_t parts, int64_t ntiles, int64_t tile, int64_t ld,
                      int64_t c) {
  for (int64_t part = 0; part < parts; ++part) {
    const float* a = partial + (part * ntiles + tile) * ld;
    for (int64_t j = 0; j < c; ++j) y[j] += a[j];
  }
}

}  // namespace sf
