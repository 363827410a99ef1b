// Format-independent driver for the portable files (csr.cpp, bitmap.cpp, nm.cpp): picks the
// algorithm, lays x out for the lanes kernels, spreads rows over the thread pool, and restores
// dense NaN/inf semantics. Include only from files compiled without -m flags.
#pragma once

#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "common.h"
#include "isa.h"
#include "lanes.h"
#include "threadpool.h"

namespace sf {
namespace detail {

constexpr int64_t kLanesMinBatch = 4;  // auto: batch >= this keeps the batch in SIMD lanes
constexpr double kParallelMinWork = 1 << 17;  // multiply-adds below which one thread does it all

class AlignedFloats {
 public:
  AlignedFloats() = default;
  explicit AlignedFloats(int64_t n) { reset(n); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  ~AlignedFloats() { std::free(p_); }
  void reset(int64_t n) {
    std::free(p_);
    p_ = nullptr;
    if (n > 0) {
      const size_t bytes = (static_cast<size_t>(n) * 4 + 63) / 64 * 64;
      p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!p_) throw std::bad_alloc();
    }
  }
  float* get() const { return p_; }

 private:
  float* p_ = nullptr;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// a (B, n) row-major -> tiles of (n, width) as described for LanesPlan
inline LanesPlan make_plan(const float* a, int64_t B, int64_t n, AlignedFloats& buf, bool par) {
  LanesPlan lp;
  lp.ntiles = ceil_div(B, kLaneTile);
  lp.tile_stride = n * kLaneTile;
  buf.reset(lp.ntiles * lp.tile_stride);
  lp.xt = buf.get();
  constexpr int64_t kCols = 256;
  const int64_t nchunks = ceil_div(n, kCols);
  float* dst_all = buf.get();
  parallel_for(
      lp.ntiles * nchunks,
      [&](int64_t task, int) {
        const int64_t t = task / nchunks, j0 = (task % nchunks) * kCols, j1 = min64(n, j0 + kCols);
        const int64_t b0 = t * kLaneTile, bn = min64(kLaneTile, B - b0), width = 16 * ceil_div(bn, 16);
        float* dst = dst_all + t * lp.tile_stride;
        for (int64_t jb = j0; jb < j1; jb += 16) {
          const int64_t je = min64(j1, jb + 16);
          int64_t b = 0;
#if defined(__SSE2__)
          // 4 x 4 blocks through registers (x86-64 baseline SSE): ~2x the scalar copy, which was
          // ~20% of a batch-64 call at 95% sparsity
          for (; b + 4 <= bn; b += 4) {
            const float* s0 = a + (b0 + b) * n;
            int64_t j = jb;
            for (; j + 4 <= je; j += 4) {
              __m128 r0 = _mm_loadu_ps(s0 + j), r1 = _mm_loadu_ps(s0 + n + j);
              __m128 r2 = _mm_loadu_ps(s0 + 2 * n + j), r3 = _mm_loadu_ps(s0 + 3 * n + j);
              _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
              _mm_storeu_ps(dst + j * width + b, r0);
              _mm_storeu_ps(dst + (j + 1) * width + b, r1);
              _mm_storeu_ps(dst + (j + 2) * width + b, r2);
              _mm_storeu_ps(dst + (j + 3) * width + b, r3);
            }
            for (; j < je; ++j)
              for (int64_t i = 0; i < 4; ++i) dst[j * width + b + i] = s0[i * n + j];
          }
#endif
          for (; b < width; ++b) {
            if (b < bn) {
              const float* src = a + (b0 + b) * n;
              for (int64_t j = jb; j < je; ++j) dst[j * width + b] = src[j];
            } else {
              for (int64_t j = jb; j < je; ++j) dst[j * width + b] = 0.f;
            }
          }
        }
      },
      par);
  return lp;
}

inline bool any_nonfinite(const float* a, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, a + i, 4);
    bad |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
  }
  return bad != 0;
}

// The fast kernels skip pruned weights, but a dense matmul computes 0 * inf = NaN there. If x has
// a NaN, every output of that batch row is NaN; if x[b, j] = +-inf, y[b, r] is NaN for each row r
// that does not store column j (stored entries, explicit zeros included, already went through
// the kernel). Rare path: only runs when x holds a non-finite value.
template <class Dec>
void fix_nonfinite(const Dec& dec, const Problem& p) {
  if (!any_nonfinite(p.x, p.B * p.in)) return;
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  std::vector<int64_t> inf_b;
  std::vector<std::vector<int64_t>> inf_cols;
  for (int64_t b = 0; b < p.B; ++b) {
    const float* xb = p.x + b * p.in;
    bool nan = false;
    std::vector<int64_t> js;
    for (int64_t j = 0; j < p.in; ++j) {
      if (std::isnan(xb[j])) nan = true;
      else if (std::isinf(xb[j])) js.push_back(j);
    }
    if (nan) {
      for (int64_t r = 0; r < p.out; ++r) p.y[b * p.out + r] = qnan;
    } else if (!js.empty()) {
      inf_b.push_back(b);
      inf_cols.push_back(std::move(js));
    }
  }
  if (inf_b.empty()) return;
  std::vector<int64_t> stamp(static_cast<size_t>(p.in), -1);
  for (int64_t r = 0; r < p.out; ++r) {
    auto cur = dec.begin(r);
    dec.run(cur, p.in, [&](int64_t j, float) { stamp[j] = r; });
    for (size_t i = 0; i < inf_b.size(); ++i) {
      for (int64_t j : inf_cols[i]) {
        if (stamp[j] != r) {
          p.y[inf_b[i] * p.out + r] = qnan;
          break;
        }
      }
    }
  }
}

// Same for dx = dy @ W: dy[b, r] NaN -> dx[b, :] NaN; dy[b, r] = +-inf -> dx[b, j] NaN for every
// column j that row r does not store.
template <class Dec>
void fix_nonfinite_t(const Dec& dec, const ProblemT& p) {
  if (!any_nonfinite(p.dy, p.B * p.out)) return;
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  std::vector<int64_t> stamp(static_cast<size_t>(p.in), -1);
  int64_t id = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    const float* db = p.dy + b * p.out;
    float* xb = p.dx + b * p.in;
    bool nan = false;
    for (int64_t r = 0; r < p.out; ++r) nan = nan || std::isnan(db[r]);
    if (nan) {
      for (int64_t j = 0; j < p.in; ++j) xb[j] = qnan;
      continue;
    }
    for (int64_t r = 0; r < p.out; ++r) {
      if (!std::isinf(db[r])) continue;
      ++id;
      auto cur = dec.begin(r);
      dec.run(cur, p.in, [&](int64_t j, float) { stamp[j] = id; });
      for (int64_t j = 0; j < p.in; ++j)
        if (stamp[j] != id) xb[j] = qnan;
    }
  }
}

inline void check_problem(int64_t rows, int64_t cols, const Problem& p) {
  if (p.in != cols || p.out != rows || p.B < 0) {
    throw std::invalid_argument("x has " + std::to_string(p.in) + " features and y " + std::to_string(p.out) +
                                " outputs, but the weight is " + std::to_string(rows) + "x" + std::to_string(cols));
  }
  if (p.col_tile < 0 || p.col_tile > kMaxColTile || p.col_tile % 64 || p.block_rows < 0 || p.block_rows > kMaxBlockRows) {
    throw std::invalid_argument("col_tile=" + std::to_string(p.col_tile) + " must be 0 (the rule) or a multiple of 64 in 64.." +
                                std::to_string(kMaxColTile) + ", block_rows=" + std::to_string(p.block_rows) +
                                " 0 (the rule) or in 1.." + std::to_string(kMaxBlockRows));
  }
}
inline void check_problem_t(int64_t rows, int64_t cols, const ProblemT& p) {
  if (p.in != cols || p.out != rows || p.B < 0) {
    throw std::invalid_argument("dy has " + std::to_string(p.out) + " features and dx " + std::to_string(p.in) +
                                ", but the weight is " + std::to_string(rows) + "x" + std::to_string(cols));
  }
}

// Scalar references (the test oracles), shared by every format: each row is decoded to dense
// with dense_row(w, r, out) and multiplied plainly. y = x @ W^T + bias and dx = dy @ W.
template <class View, class DenseRow>
void linear_ref(const View& w, const Problem& p, DenseRow dense_row) {
  check_problem(w.rows, w.cols, p);
  std::vector<float> row(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    dense_row(w, r, row.data());
    for (int64_t b = 0; b < p.B; ++b) {
      float acc = 0.f;
      for (int64_t j = 0; j < w.cols; ++j) acc += row[j] * p.x[b * p.in + j];
      p.y[b * p.out + r] = acc + (p.bias ? p.bias[r] : 0.f);
    }
  }
}

template <class View, class DenseRow>
void linear_t_ref(const View& w, const ProblemT& p, DenseRow dense_row) {
  check_problem_t(w.rows, w.cols, p);
  std::vector<float> row(static_cast<size_t>(w.cols));
  for (int64_t i = 0; i < p.B * p.in; ++i) p.dx[i] = 0.f;
  for (int64_t r = 0; r < w.rows; ++r) {
    dense_row(w, r, row.data());
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t j = 0; j < w.cols; ++j) p.dx[b * p.in + j] += row[j] * p.dy[b * p.out + r];
  }
}

inline void check_problem_w(int64_t rows, int64_t cols, const ProblemW& p) {
  if (p.in != cols || p.out != rows || p.B < 0) {
    throw std::invalid_argument("x has " + std::to_string(p.in) + " features and dy " + std::to_string(p.out) +
                                ", but the weight is " + std::to_string(rows) + "x" + std::to_string(cols));
  }
}

// SDDMM reference (test oracle): stored(w, r, f) calls f(col, value_index) for each stored entry of
// row r (written per format, independent of the decoders); each is a plain dot product over b.
template <class View, class Stored>
void sddmm_ref(const View& w, const ProblemW& p, Stored stored) {
  check_problem_w(w.rows, w.cols, p);
  for (int64_t r = 0; r < w.rows; ++r) {
    stored(w, r, [&](int64_t c, int64_t q) {
      float acc = 0.f;
      for (int64_t b = 0; b < p.B; ++b) acc += p.dy[b * p.out + r] * p.x[b * p.in + c];
      p.dw[q] = acc;
    });
  }
}

// dw = (dy^T x) sampled at the stored entries with kernel table k (k.sddmm, one row block): x and dy are
// transposed into lanes tiles once, then row blocks run over the pool (rows own disjoint dw ranges).
template <class View, class Kern>
void run_sddmm(const View& w, const ProblemW& p, const Kern& k, int64_t nnz) {
  check_problem_w(w.rows, w.cols, p);
  if (nnz == 0) return;
  if (p.B == 0) {
    for (int64_t i = 0; i < nnz; ++i) p.dw[i] = 0.f;
    return;
  }
  const int nt = num_threads();
  const bool par = nt > 1 && static_cast<double>(nnz + p.in + p.out) * static_cast<double>(p.B) > kParallelMinWork;
  AlignedFloats xt, dyt;
  const LanesPlan xp = make_plan(p.x, p.B, p.in, xt, par);
  const LanesPlan dp = make_plan(p.dy, p.B, p.out, dyt, par);
  const int64_t ntasks = par ? min64(p.out, int64_t{nt} * 16) : 1;
  const int64_t per = ceil_div(p.out, ntasks);
  parallel_for(
      ceil_div(p.out, per), [&](int64_t t, int) { k.sddmm(w, p, xp, dp, t * per, min64(p.out, (t + 1) * per)); }, par);
}

// The lanes kernels' column tile (lp.col_tile) and rows per task for a weight with nnz stored entries;
// shared by run_linear and the int8 driver (int8.cpp).
inline int64_t lanes_rows(const Problem& p, int64_t nnz, int nt, bool par, LanesPlan& lp) {
  // rows per task: enough stored entries per row block to amortise streaming the x tiles through L1
  const double density = p.in > 0 ? static_cast<double>(nnz) / (static_cast<double>(p.out) * p.in) : 1.0;
  // columns per tile (at 64 lanes): 32 / density, 128..512, i.e. ~32 stored entries per (row, tile)
  // at 75-90% sparsity, fewer tiles' worth of per-tile cost (sums in and out of ybuf, loop exits)
  // against an xt tile (T x 256 B) that stays closer to L1. Sweep on one 4096x11008 layer, batch 64,
  // 1 thread, TSC cycles per stored weight (T = 128 / 256 / 512 / 1024): 50% bitmap 3.08 / 3.60 /
  // 5.28 / 5.48; 75% CSR 3.77 / 3.67 / 4.43 / 4.86; 90% CSR 4.83 / 3.97 / 4.66 / 4.93; 95% CSR
  // 6.44 / 5.85 / 5.47 / 6.27 (the old 64 / density rule picked 640 at 90%, 1024 at 95%).
  // Rounded to the nearest power of two (in log scale) since session 4: on the 8-layer stack, batch
  // 64, 2 threads, 90% CSR ran 32.5-35.2 ms with 256-column tiles against 35.2-41.1 with the 320 of
  // the linear rule (three alternating rounds; 384: 33.7-34.7), 85% 44.0 with 256 against 46.3 with
  // 192; 80% (128 or 192), 75% (128) and 95% (512) keep their best values.
  const double cols_per_32 = 32.0 / (density > 1e-3 ? density : 1e-3);
  lp.col_tile = max64(128, min64(512, int64_t{1} << static_cast<int>(std::lround(std::log2(cols_per_32)))));
  if (p.col_tile > 0) lp.col_tile = p.col_tile;  // the caller's measured tile (check_tile)
  // R = 32 / density rows (each xt column serves ~32 entries per block): every block streams all of
  // xt (2.8 MB at 11008 inputs, beyond L2) once, so fewer, larger blocks (64 rows at 50%) ran
  // 1.1-1.5x faster than 16 rows (microbenchmark, 1024x11008, 1 thread)
  int64_t R = static_cast<int64_t>(std::ceil(32.0 / (density > 1e-3 ? density : 1e-3)));
  R = max64(16, min64(kMaxBlockRows, R));
  if (par) R = max64(1, min64(R, ceil_div(p.out, int64_t{nt} * 4)));
  return p.block_rows > 0 ? p.block_rows : R;
}

// rows(r0, r1) over the row tasks of the batch-1-3 ("rows") kernels: up to 16 per thread, on the pool
// when the work (nnz + out per batch row) is large enough; nnz = stored entries.
template <class RowsFn>
void for_row_tasks(const Problem& p, int64_t nnz, RowsFn&& rows) {
  if (p.out == 0) return;
  const int nt = num_threads();
  const bool par = nt > 1 && static_cast<double>(nnz + p.out) * static_cast<double>(p.B) > kParallelMinWork;
  const int64_t ntasks = par ? min64(p.out, int64_t{nt} * 16) : 1;
  const int64_t per = ceil_div(p.out, ntasks);
  parallel_for(ceil_div(p.out, per), [&](int64_t t, int) { rows(t * per, min64(p.out, (t + 1) * per)); }, par);
}

// y = x @ W^T + bias with kernel table k; nnz = stored entries (for work estimates).
template <class View, class Kern>
void run_linear(const View& w, const Problem& p, const Kern& k, int algo, int64_t nnz) {
  if (p.B == 0 || p.out == 0) return;
  const int nt = num_threads();
  const bool par = nt > 1 && static_cast<double>(nnz + p.out) * static_cast<double>(p.B) > kParallelMinWork;
  const bool lanes = algo == 2 || (algo == 0 && p.B >= kLanesMinBatch);
  if (!lanes) {
    for_row_tasks(p, nnz, [&](int64_t r0, int64_t r1) { k.rows(w, p, r0, r1); });
    return;
  }
  AlignedFloats xt;
  LanesPlan lp = make_plan(p.x, p.B, p.in, xt, par);
  const int64_t R = lanes_rows(p, nnz, nt, par, lp);
  AlignedFloats ybuf(int64_t{nt} * R * kLaneTile);
  parallel_for(
      ceil_div(p.out, R),
      [&](int64_t t, int wk) {
        k.lanes(w, p, lp, t * R, min64(p.out, (t + 1) * R), ybuf.get() + wk * R * kLaneTile);
      },
      par);
}

// dx = dy @ W with kernel table k: row blocks scatter into per-thread (in, 64) accumulators.
template <class View, class Kern>
void run_linear_t(const View& w, const ProblemT& p, const Kern& k, int64_t nnz) {
  if (p.B == 0 || p.in == 0) return;
  if (p.out == 0) {
    for (int64_t i = 0; i < p.B * p.in; ++i) p.dx[i] = 0.f;
    return;
  }
  const int nt = num_threads();
  const bool par = nt > 1 && static_cast<double>(nnz + p.in) * static_cast<double>(p.B) > kParallelMinWork;
  AlignedFloats dyt;
  LanesPlan lp = make_plan(p.dy, p.B, p.out, dyt, par);
  const int64_t per_worker = lp.ntiles * p.in * kLaneTile;
  AlignedFloats acc(int64_t{nt} * per_worker);
  std::vector<char> touched(static_cast<size_t>(nt), 0);
  const int64_t ntasks = par ? min64(p.out, int64_t{nt} * 8) : 1;
  const int64_t per = ceil_div(p.out, ntasks);
  parallel_for(
      ceil_div(p.out, per),
      [&](int64_t t, int wk) {
        float* mine = acc.get() + wk * per_worker;
        if (!touched[wk]) {
          std::memset(mine, 0, static_cast<size_t>(per_worker) * 4);
          touched[wk] = 1;
        }
        k.lanes_t(w, p, lp, t * per, min64(p.out, (t + 1) * per), mine);
      },
      par);
  constexpr int64_t kCols = 512;
  const int64_t nchunks = ceil_div(p.in, kCols);
  parallel_for(
      lp.ntiles * nchunks,
      [&](int64_t task, int) {
        const int64_t t = task / nchunks, j0 = (task % nchunks) * kCols, j1 = min64(p.in, j0 + kCols);
        const int64_t b0 = t * kLaneTile, bn = min64(kLaneTile, p.B - b0), width = 16 * ceil_div(bn, 16);
        for (int64_t b = 0; b < bn; ++b) {
          float* out = p.dx + (b0 + b) * p.in;
          for (int64_t j = j0; j < j1; ++j) {
            float s = 0.f;
            for (int wk = 0; wk < nt; ++wk)
              if (touched[wk]) s += acc.get()[wk * per_worker + t * p.in * kLaneTile + j * width + b];
            out[j] = s;
          }
        }
      },
      par);
}

}  // namespace detail
}  // namespace sf
