// Batch-1 GEMVs over channel parts (sparse_input.cpp, column_sparse.cpp): the active channels of one
// row are cut into parts that each sweep wide column tiles (each channel's weights for a tile are one
// contiguous run; narrow tiles cut them into short runs that restart the hardware prefetchers per
// channel), then the parts' partial sums are added in order. The number of parts depends on the
// active channels only, never on the thread count, so results do not change with the threads.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "threadpool.h"

namespace sf {

constexpr int64_t kPartChannels = 256;  // fewest active channels in a part
constexpr int64_t kMaxParts = 4;

// parts for n active channels: 1 .. kMaxParts
inline int64_t channel_parts(int64_t n) {
  const int64_t p = n / kPartChannels;
  return p < 1 ? 1 : (p > kMaxParts ? kMaxParts : p);
}

// The parts' partial sums: (parts, ntiles, ld) floats, column tile t of part q at (q * ntiles + t) * ld.
struct PartialSums {
  int64_t parts, ntiles, cw, ld;
  std::vector<float> sums;
};

// The layout of n active channels' partial sums over `out` columns in tiles of cw (sums not allocated):
// parts(n) x ceil(out / cw) tasks, task t = (part t / ntiles, column tile t % ntiles).
inline PartialSums part_layout(int64_t n, int64_t out, int64_t cw, int64_t ld) {
  return PartialSums{channel_parts(n), (out + cw - 1) / cw, cw, ld, {}};
}

// Task t of layout s over `sums` (its parts * ntiles * ld floats, zeroed): tile(k0, k1, j0, c, a) adds the
// products of active channels [k0, k1) to a[0:c] for output columns [j0, j0 + c).
template <class Tile>
inline void run_part_task(const PartialSums& s, int64_t n, int64_t out, int64_t t, float* sums, Tile& tile) {
  const int64_t part = t / s.ntiles, j0 = (t % s.ntiles) * s.cw;
  tile(n * part / s.parts, n * (part + 1) / s.parts, j0, min64(s.cw, out - j0), sums + t * s.ld);
}

// tile(k0, k1, j0, c, a) adds the products of active channels [k0, k1) to a[0:c] (zeroed, ld floats)
// for output columns [j0, j0 + c); one task per part and column tile of width cw (the last narrower).
template <class Tile>
PartialSums partial_sums(int64_t n, int64_t out, int64_t cw, int64_t ld, bool parallel, Tile tile) {
  PartialSums s = part_layout(n, out, cw, ld);
  s.sums.assign(static_cast<size_t>(s.parts * s.ntiles * ld), 0.f);
  parallel_for(
      s.parts * s.ntiles, [&](int64_t t, int) { run_part_task(s, n, out, t, s.sums.data(), tile); }, parallel);
  return s;
}

// y[0:out] += the parts' partial sums `sums` (layout s), part by part in order
inline void add_parts(const PartialSums& s, const float* sums, int64_t out, float* y) {
  for (int64_t tile = 0; tile < s.ntiles; ++tile) {
    const int64_t j0 = tile * s.cw, c = min64(s.cw, out - j0);
    for (int64_t part = 0; part < s.parts; ++part) {
      const float* a = sums + (part * s.ntiles + tile) * s.ld;
      for (int64_t j = 0; j < c; ++j) y[j0 + j] += a[j];
    }
  }
}

inline void add_parts(const PartialSums& s, int64_t out, float* y) { add_parts(s, s.sums.data(), out, y); }

}  // namespace sf
