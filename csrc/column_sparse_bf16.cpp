// bf16 compute for the column-sparse layer (column_sparse_bf16.h): the scalar multiply, the path's
// kernel table, and the driver that masks, lists the union of active channels, packs the rows over
// it and spreads 512-output blocks over the thread pool.
#include "column_sparse_bf16.h"

#include <cmath>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "column_sparse_bf16_kernels.h"
#include "threadpool.h"

namespace sf {
namespace {

// widened to float32, multiplied and summed in plain C++ (any CPU)
struct ColScalarMicro {
  template <class Side>
  void mul(const uint16_t* panel, const ColBf16Tile& t, int64_t k0, int64_t kc, float* acc, Side&&) const {
    for (int64_t b = 0; b < t.nbt * 16; ++b) {
      const uint16_t* xr = t.xa + b * t.ldx + k0;
      float* ar = acc + b * kColBf16Outs;
      for (int64_t q = 0; q < kc / 2; ++q) {
        const float x0 = bf16_to_f32(xr[2 * q]), x1 = bf16_to_f32(xr[2 * q + 1]);
        const uint16_t* prow = panel + q * 2 * kColBf16Outs;
        for (int64_t o = 0; o < kColBf16Outs; ++o) ar[o] += x0 * bf16_to_f32(prow[2 * o]) + x1 * bf16_to_f32(prow[2 * o + 1]);
      }
    }
  }
};

// the table of a path (require_bf16_path also makes sure the process asked Linux for the AMX tile state)
const ColumnSparseBf16Kernels& col_bf16_kernels(Bf16Path path) {
  require_bf16_path(path);
#if defined(SF_HAVE_BF16_KERNELS)
  if (path == Bf16Path::avx512_bf16) return avx512bf16::column_sparse_bf16;
#endif
#if defined(SF_HAVE_AMX_KERNELS)
  if (path == Bf16Path::amx) return amx::column_sparse_bf16;
#endif
  return scalar::column_sparse_bf16;
}

struct Aligned64 {
  explicit Aligned64(int64_t bytes) {
    p = std::aligned_alloc(64, static_cast<size_t>((max64(bytes, 1) + 63) / 64 * 64));
    if (!p) throw std::bad_alloc();
  }
  Aligned64(const Aligned64&) = delete;
  Aligned64& operator=(const Aligned64&) = delete;
  ~Aligned64() { std::free(p); }
  void* p;
};

constexpr int64_t kParallelMinMacs = 1 << 18;  // multiply-adds below which one thread does it all

}  // namespace

namespace scalar {
extern const ColumnSparseBf16Kernels column_sparse_bf16 = ColBf16Table<ColScalarMicro>::kTable;
}  // namespace scalar

void column_sparse_linear_bf16(const ColumnSparseProblem& p, Bf16Path path, bool parallel) {
  column_sparse_check_problem(p);
  if (p.w.vt == VT::i8) {
    throw std::invalid_argument("column_sparse_linear_bf16 takes float32 or bfloat16 values; int8 values run "
                                "column_sparse_linear (float32 compute)");
  }
  const ColumnSparseBf16Kernels& k = col_bf16_kernels(path);
  const ColumnSparseWeight& w = p.w;
  if (p.B == 0 || w.out == 0) return;
  const int64_t in = w.in, nblk = w.nblk();
  const int nth = num_threads();
  std::vector<int32_t> chan(static_cast<size_t>(in));
  std::vector<float> xm(static_cast<size_t>(kColBf16Batch * in));  // masked rows
  std::vector<uint8_t> any(static_cast<size_t>(in));
  Aligned64 xa(kColBf16Batch * ((in + 31) / 32 * 32 + 32) * 2);
  const int64_t scratch_bytes = (column_sparse_bf16_scratch(in) + 63) / 64 * 64;
  Aligned64 scratch_all(int64_t{nth} * scratch_bytes);
  for (int64_t b0 = 0; b0 < p.B; b0 += kColBf16Batch) {
    const int64_t bn = min64(kColBf16Batch, p.B - b0);
    // xm: the rows with their skipped channels zeroed (selects, no branches: the mask is random);
    // the union lists the channels active in any row
    std::fill(any.begin(), any.end(), uint8_t{0});
    for (int64_t b = 0; b < bn; ++b) {
      const float* xr = p.x + (b0 + b) * in;
      float* mr = xm.data() + b * in;
      const int64_t tstep = p.thr_per_channel ? 1 : 0;
      for (int64_t i = 0; i < in; ++i) {
        const uint32_t keep = !(std::fabs(xr[i]) <= p.thr[i * tstep]);
        uint32_t u;
        std::memcpy(&u, xr + i, 4);
        u &= 0u - keep;
        std::memcpy(mr + i, &u, 4);
        any[i] |= static_cast<uint8_t>(keep);
      }
    }
    int64_t nu = 0;
    for (int64_t i = 0; i < in; ++i) {
      chan[nu] = static_cast<int32_t>(i);
      nu += any[i];
    }
    ColBf16Tile t;
    t.chan = chan.data();
    t.nu = nu;
    t.kp = (nu + 31) / 32 * 32;
    t.ldx = t.kp + 32;
    t.nbt = (bn + 15) / 16;
    t.b0 = b0;
    t.bn = bn;
    t.p = &p;
    uint16_t* xp = static_cast<uint16_t*>(xa.p);
    for (int64_t b = 0; b < t.nbt * 16; ++b) {
      uint16_t* dst = xp + b * t.ldx;
      const float* mr = xm.data() + b * in;
      const int64_t filled = b < bn ? nu : 0;
      for (int64_t q = 0; q < filled; ++q) dst[q] = f32_to_bf16(mr[chan[q]]);
      for (int64_t q = filled; q < t.kp; ++q) dst[q] = 0;
    }
    t.xa = xp;
    const bool par = parallel && nth > 1 && static_cast<double>(bn) * static_cast<double>(t.kp) *
                                                  static_cast<double>(w.out) >= static_cast<double>(kParallelMinMacs);
    parallel_for(
        nblk,
        [&](int64_t blk, int worker) {
          const int64_t j0 = blk * kColBlock;
          k.block(t, j0, min64(kColBlock, w.out - j0), static_cast<char*>(scratch_all.p) + worker * scratch_bytes);
        },
        par);
  }
}

}  // namespace sf
