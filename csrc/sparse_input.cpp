// Sparse-input linear layer: scalar reference (test oracle), portable kernels, run-time dispatch and
// the driver that compacts the active channels and spreads output tiles over the thread pool.
#include "sparse_input.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparse_input_kernels.h"
#include "channel_parts.h"
#include "threadpool.h"

namespace sf {

namespace scalar {
extern const SparseInputKernels sparse_input_kernels = kSparseInputKernels;
}  // namespace scalar

namespace {

constexpr int64_t kGemmColTile = 256;          // output columns per GEMM task
constexpr int64_t kGemmChannelBlock = 256;     // input channels per GEMM block (256 x 256 weights in L2)
constexpr int64_t kParallelMinWeights = 1 << 15;  // weights read below which one thread does it all

const SparseInputKernels& kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return avx512::sparse_input_kernels;
  if (isa == Isa::avx2) return avx2::sparse_input_kernels;
#endif
  (void)isa;
  return scalar::sparse_input_kernels;
}

void check(const SparseInputProblem& p) {
  if (p.B < 0 || p.in < 0 || p.out < 0) {
    throw std::invalid_argument("sparse-input linear needs B, in, out >= 0; got B=" + std::to_string(p.B) +
                                " in=" + std::to_string(p.in) + " out=" + std::to_string(p.out));
  }
  const int64_t nt = p.thr_per_channel ? p.in : 1;
  for (int64_t i = 0; i < nt; ++i) {
    if (!(p.thr[i] >= 0.f)) {
      throw std::invalid_argument("threshold " + std::to_string(p.thr[i]) + " (channel " + std::to_string(i) +
                                  ") must be >= 0 and not NaN; use 0 for a dense layer, +inf to skip every channel");
    }
  }
}

inline bool active(const SparseInputProblem& p, int64_t b, int64_t i) {
  const float t = p.thr_per_channel ? p.thr[i] : p.thr[0];
  return !(std::fabs(p.x[b * p.in + i]) <= t);
}

void init_rows(const SparseInputProblem& p, int64_t j0, int64_t cw) {
  for (int64_t b = 0; b < p.B; ++b) {
    float* yb = p.y + b * p.out + j0;
    for (int64_t j = 0; j < cw; ++j) yb[j] = p.bias ? p.bias[j0 + j] : 0.f;
  }
}

// output columns per GEMV task: about four tasks per thread (dynamic scheduling absorbs a core
// taken by another process), whole 64-float runs, at least 512 (2 KB of fp32 per active channel and
// task, a run the prefetchers follow) and at most 4096 columns (16 KB of partial sums, in L1)
int64_t gemv_col_tile(int64_t out) {
  const int64_t per = (out + 4 * num_threads() - 1) / (4 * num_threads());
  return min64(4096, max64(512, (per + 63) / 64 * 64));
}

// One row (batch 1): the GEMV over channel parts (channel_parts.h).
constexpr int64_t kPartTile = 8192;  // columns per task (32 KB of partial sums)

void gemv_parts(const SparseInputProblem& p, const SparseInputKernels& k, const int32_t* idx, const float* xv,
                int64_t n, bool parallel) {
  const int64_t cw = min64(kPartTile, p.out);
  const PartialSums parts = partial_sums(n, p.out, cw, cw, parallel,
                                         [&](int64_t k0, int64_t k1, int64_t j0, int64_t c, float* a) {
                                           k.gemv_tile(p.w, p.wt, p.out, idx + k0, xv + k0, k1 - k0, j0, c, a);
                                         });
  init_rows(p, 0, p.out);
  add_parts(parts, p.out, p.y);
}

}  // namespace

void sparse_input_linear_ref(const SparseInputProblem& p) {
  check(p);
  for (int64_t b = 0; b < p.B; ++b) {
    float* yb = p.y + b * p.out;
    for (int64_t j = 0; j < p.out; ++j) yb[j] = p.bias ? p.bias[j] : 0.f;
    for (int64_t i = 0; i < p.in; ++i) {
      if (!active(p, b, i)) continue;
      const float xi = p.x[b * p.in + i];
      for (int64_t j = 0; j < p.out; ++j)
        yb[j] += xi * (p.wt == VT::f32 ? load_val<VT::f32>(p.w, i * p.out + j) : load_val<VT::bf16>(p.w, i * p.out + j));
    }
  }
}

void sparse_input_count(const SparseInputProblem& p, int64_t* counts) {
  check(p);
  for (int64_t b = 0; b < p.B; ++b) {
    int64_t n = 0;
    for (int64_t i = 0; i < p.in; ++i) n += active(p, b, i);
    counts[b] = n;
  }
}

void sparse_input_linear(const SparseInputProblem& p, Isa isa, int algo, bool parallel) {
  check(p);
  if (algo < 0 || algo > 2) throw std::invalid_argument("algo must be 0 (auto), 1 (gemv) or 2 (gemm)");
  if (p.B == 0 || p.out == 0) return;
  const SparseInputKernels& k = kernels(isa);
  // Compacted rows, back to back: row b's lists start at off[b]. A row writes at most in + 1
  // entries (the scalar loop stores one past its count), so 2 * in + 32 entries hold the rows while
  // their total stays <= in (the GEMV case of auto); a forced GEMV gets room for every channel.
  const int64_t cap = algo == 1 ? p.B * (p.in + 16) : 2 * p.in + 32;
  std::vector<int32_t> idx(static_cast<size_t>(cap));
  std::vector<float> xv(static_cast<size_t>(cap));
  std::vector<int64_t> n(static_cast<size_t>(p.B)), off(static_cast<size_t>(p.B) + 1, 0);
  int64_t total = 0;
  for (int64_t b = 0; b < p.B && (algo == 1 || total <= p.in); ++b) {
    n[b] = k.compact(p.x + b * p.in, p.in, p.thr, p.thr_per_channel, idx.data() + total, xv.data() + total);
    total += n[b];
    off[b + 1] = total;
  }
  const bool gemv = algo == 1 || (algo == 0 && total <= p.in);
  if (gemv) {
    const bool par = parallel && total * p.out >= kParallelMinWeights;
    if (p.B == 1) {
      gemv_parts(p, k, idx.data(), xv.data(), n[0], par);
      return;
    }
    const int64_t cw = gemv_col_tile(p.out);
    const int64_t ntiles = (p.out + cw - 1) / cw;
    parallel_for(
        ntiles,
        [&](int64_t t, int) {
          const int64_t j0 = t * cw, c = min64(cw, p.out - j0);
          init_rows(p, j0, c);
          for (int64_t b = 0; b < p.B; ++b) {
            k.gemv_tile(p.w, p.wt, p.out, idx.data() + off[b], xv.data() + off[b], n[b], j0, c, p.y + b * p.out + j0);
          }
        },
        par);
    return;
  }
  // masked rows (skipped channels set to 0), then the GEMM over the [in, out] layout
  std::vector<float> xm(static_cast<size_t>(p.B * p.in));
  for (int64_t b = 0; b < p.B; ++b) {
    const float* xb = p.x + b * p.in;
    float* mb = xm.data() + b * p.in;
    for (int64_t i = 0; i < p.in; ++i) {
      const float t = p.thr_per_channel ? p.thr[i] : p.thr[0];
      mb[i] = std::fabs(xb[i]) <= t ? 0.f : xb[i];
    }
  }
  const int64_t ntiles = (p.out + kGemmColTile - 1) / kGemmColTile;
  const bool par = parallel && p.B * p.in * p.out >= kParallelMinWeights;
  parallel_for(
      ntiles,
      [&](int64_t t, int) {
        const int64_t j0 = t * kGemmColTile, c = min64(kGemmColTile, p.out - j0);
        init_rows(p, j0, c);
        for (int64_t k0 = 0; k0 < p.in; k0 += kGemmChannelBlock) {
          k.gemm_tile(p.w, p.wt, p.out, xm.data(), p.in, p.B, k0, min64(k0 + kGemmChannelBlock, p.in), j0, c, p.y,
                      p.out);
        }
      },
      par);
}

}  // namespace sf
