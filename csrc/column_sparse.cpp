// Column-sparse linear layer: scalar reference (test oracle), portable kernels, run-time dispatch,
// buffer checks and the driver that compacts the active channels and spreads column tiles over the
// thread pool.
#include "column_sparse.h"
#include "column_sparse_bf16.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "buffers.h"
#include "column_sparse_kernels.h"
#include "sparse_input.h"
#include "channel_parts.h"
#include "isa.h"
#include "threadpool.h"

namespace sf {

namespace scalar {
extern const ColumnSparseKernels column_sparse_kernels = kColumnSparseKernels;
}  // namespace scalar

namespace {

constexpr int64_t kPanelChannels = 128;       // channels per decoded panel (128 x 512 floats = 256 KB, in L2)
constexpr int64_t kParallelMinValues = 1 << 15;  // stored values read below which one thread does it all
constexpr const char* kOp = "column_sparse_linear";

struct IsaKernels {
  const ColumnSparseKernels* col;
  const SparseInputKernels* si;  // threshold compaction and the GEMM over a dense panel
};

IsaKernels kernels(Isa isa) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) {
#if defined(SF_HAVE_VBMI2_KERNELS)
    if (use_avx512_vbmi2()) return {&avx512vbmi2::column_sparse_kernels, &avx512::sparse_input_kernels};
#endif
    return {&avx512::column_sparse_kernels, &avx512::sparse_input_kernels};
  }
  if (isa == Isa::avx2) return {&avx2::column_sparse_kernels, &avx2::sparse_input_kernels};
#endif
  (void)isa;
  return {&scalar::column_sparse_kernels, &scalar::sparse_input_kernels};
}

inline int64_t round64(int64_t n) { return (n + 63) / 64 * 64; }

inline bool active(const ColumnSparseProblem& p, int64_t b, int64_t i) {
  const float t = p.thr_per_channel ? p.thr[i] : p.thr[0];
  return !(std::fabs(p.x[b * p.w.in + i]) <= t);
}

// The start of an output's sum: its bias for float values, 0 for int8 (scaled, then biased, at the end).
inline float sum_start(const ColumnSparseProblem& p, int64_t j) {
  return p.w.vt != VT::i8 && p.bias ? p.bias[j] : 0.f;
}

// int8 values: y[j] = scales[j] * y[j] + bias[j] over outputs [j0, j0 + cw) of every row.
void finish_int8(const ColumnSparseProblem& p, float* y, int64_t ld, int64_t rows, int64_t j0, int64_t cw) {
  if (p.w.vt != VT::i8) return;
  for (int64_t b = 0; b < rows; ++b) {
    float* yb = y + b * ld;
    for (int64_t j = 0; j < cw; ++j) yb[j] = p.w.scales[j0 + j] * yb[j] + (p.bias ? p.bias[j0 + j] : 0.f);
  }
}

void init_rows(const ColumnSparseProblem& p, int64_t j0, int64_t cw) {
  for (int64_t b = 0; b < p.B; ++b) {
    float* yb = p.y + b * p.w.out + j0;
    for (int64_t j = 0; j < cw; ++j) yb[j] = sum_start(p, j0 + j);
  }
}

// GEMV column tile: whole 512-column blocks, about four tasks per thread, at most 4096 columns
// (16 KB of partial sums, in L1)
int64_t gemv_col_tile(int64_t out) {
  const int64_t per = (out + 4 * num_threads() - 1) / (4 * num_threads());
  return min64(8 * kColBlock, max64(kColBlock, (per + kColBlock - 1) / kColBlock * kColBlock));
}

// One row (batch 1): the GEMV over channel parts (channel_parts.h).
constexpr int64_t kPartTile = 16 * kColBlock;  // columns per task (32 KB of partial sums)
static_assert(kPartTile <= kMaxTileColumns && 8 * kColBlock <= kMaxTileColumns,
              "the GEMV walks stage at most kMaxTileColumns columns of bits per channel");

int64_t part_tile(const ColumnSparseWeight& w) { return min64(kPartTile, (w.out + kColBlock - 1) / kColBlock * kColBlock); }

// y = the start of each sum + the parts' partial sums `sums` (layout s), then the int8 scales
void finish_parts(const ColumnSparseProblem& p, const PartialSums& s, const float* sums) {
  for (int64_t j = 0; j < p.w.out; ++j) p.y[j] = sum_start(p, j);
  add_parts(s, sums, p.w.out, p.y);
  finish_int8(p, p.y, p.w.out, 1, 0, p.w.out);
}

void gemv_parts(const ColumnSparseProblem& p, const ColumnSparseKernels& col, const int32_t* idx, const float* xv,
                int64_t n, bool parallel) {
  const ColumnSparseWeight& w = p.w;
  const int64_t cw = part_tile(w);
  const PartialSums parts = partial_sums(n, w.out, cw, round64(cw), parallel,
                                         [&](int64_t k0, int64_t k1, int64_t j0, int64_t c, float* a) {
                                           col.gemv_tile(w, idx + k0, xv + k0, k1 - k0, j0, c, a);
                                         });
  finish_parts(p, parts, parts.sums.data());
}

inline float weight_at(const ColumnSparseWeight& w, int64_t pos) {
  if (w.vt == VT::i8) return load_val<VT::i8>(w.values, pos);
  return w.vt == VT::f32 ? load_val<VT::f32>(w.values, pos) : load_val<VT::bf16>(w.values, pos);
}

}  // namespace

void column_sparse_check_problem(const ColumnSparseProblem& p) {
  const ColumnSparseWeight& w = p.w;
  if (p.B < 0 || w.in < 0 || w.out < 0 || w.nnz < 0) {
    throw std::invalid_argument("column-sparse linear needs B, in, out, nnz >= 0; got B=" + std::to_string(p.B) +
                                " in=" + std::to_string(w.in) + " out=" + std::to_string(w.out));
  }
  if (w.block_ptr[0] != 0 || w.block_ptr[w.in * w.nblk()] != w.nnz) {
    bad_weight(kOp, "block_ptr must start at 0 and end at the number of values (" + std::to_string(w.nnz) + "), got " +
                        std::to_string(w.block_ptr[0]) + " .. " + std::to_string(w.block_ptr[w.in * w.nblk()]));
  }
  if ((w.vt == VT::i8) != (w.scales != nullptr)) {
    bad_weight(kOp, "int8 values need float32 scales of shape (out,), and only int8 values take scales");
  }
  const int64_t nt = p.thr_per_channel ? w.in : 1;
  for (int64_t i = 0; i < nt; ++i) {
    if (!(p.thr[i] >= 0.f)) {
      throw std::invalid_argument("threshold " + std::to_string(p.thr[i]) + " (channel " + std::to_string(i) +
                                  ") must be >= 0 and not NaN; use 0 for a dense input, +inf to skip every channel");
    }
  }
}

void column_sparse_check_weight(const ColumnSparseWeight& w) {
  const int64_t words = w.words(), nblk = w.nblk();
  const int64_t wpb = kColBlock / 64;  // words per block
  for (int64_t i = 0; i < w.in; ++i) {
    const uint64_t* bm = w.bitmap + i * words;
    if (w.out % 64 && (bm[words - 1] >> (w.out % 64)) != 0) {
      bad_weight(kOp, "bitmap of channel " + std::to_string(i) + " has bits set past output " + std::to_string(w.out));
    }
    for (int64_t b = 0; b < nblk; ++b) {
      int64_t count = 0;
      for (int64_t q = b * wpb; q < min64(words, (b + 1) * wpb); ++q) count += __builtin_popcountll(bm[q]);
      const int64_t e = i * nblk + b;
      if (w.block_ptr[e + 1] - w.block_ptr[e] != count) {
        bad_weight(kOp, "block_ptr[" + std::to_string(e + 1) + "] - block_ptr[" + std::to_string(e) + "] = " +
                            std::to_string(w.block_ptr[e + 1] - w.block_ptr[e]) + " but the bitmap block holds " +
                            std::to_string(count) + " values");
      }
    }
  }
  if (w.block_ptr[0] != 0 || w.block_ptr[w.in * nblk] != w.nnz) {
    bad_weight(kOp, "block_ptr must start at 0 and end at the number of values (" + std::to_string(w.nnz) + ")");
  }
  if ((w.vt == VT::i8) != (w.scales != nullptr)) {
    bad_weight(kOp, "int8 values need float32 scales of shape (out,), and only int8 values take scales");
  }
  for (int64_t j = 0; w.scales && j < w.out; ++j) {
    if (!(std::isfinite(w.scales[j]) && w.scales[j] > 0.f)) {
      bad_weight(kOp, "scales[" + std::to_string(j) + "] = " + std::to_string(w.scales[j]) +
                          " must be finite and > 0 (one float32 scale per output row)");
    }
  }
}

namespace {

// The reference loops: xval(b, i) the value an active channel contributes, wval(pos) a stored weight.
template <class XVal, class WVal>
void reference_loops(const ColumnSparseProblem& p, XVal xval, WVal wval) {
  column_sparse_check_problem(p);
  const ColumnSparseWeight& w = p.w;
  for (int64_t b = 0; b < p.B; ++b) {
    float* yb = p.y + b * w.out;
    for (int64_t j = 0; j < w.out; ++j) yb[j] = sum_start(p, j);
    for (int64_t i = 0; i < w.in; ++i) {
      if (!active(p, b, i)) continue;
      const float xi = xval(b, i);
      int64_t pos = w.block_ptr[i * w.nblk()];
      for (int64_t j = 0; j < w.out; ++j) {
        const bool stored = (w.bitmap[i * w.words() + j / 64] >> (j % 64)) & 1u;
        yb[j] += xi * (stored ? wval(pos++) : 0.f);  // a pruned weight is 0 (inf * 0 = NaN, as dense)
      }
    }
  }
  finish_int8(p, p.y, w.out, p.B, 0, w.out);
}

}  // namespace

const char* column_sparse_walk(Isa isa) {
#if defined(SF_HAVE_VBMI2_KERNELS)
  if (isa == Isa::avx512 && use_avx512_vbmi2()) return "avx512_vbmi2";
#endif
  return isa_name(isa);
}

void column_sparse_linear_ref(const ColumnSparseProblem& p) {
  reference_loops(
      p, [&](int64_t b, int64_t i) { return p.x[b * p.w.in + i]; }, [&](int64_t pos) { return weight_at(p.w, pos); });
}

void column_sparse_linear_bf16_ref(const ColumnSparseProblem& p) {
  auto round = [](float v) { return bf16_to_f32(f32_to_bf16(v)); };
  reference_loops(
      p, [&](int64_t b, int64_t i) { return round(p.x[b * p.w.in + i]); },
      [&](int64_t pos) { return round(weight_at(p.w, pos)); });
}

void column_sparse_linear_group(const ColumnSparseProblem* ps, int64_t count, Isa isa, bool parallel) {
  for (int64_t m = 0; m < count; ++m) column_sparse_check_problem(ps[m]);
  const IsaKernels k = kernels(isa);
  struct Member {
    const ColumnSparseProblem* p;
    int64_t n = 0;           // active channels
    int64_t at = 0;          // first entry in idx / xv
    int64_t task0 = 0;       // first task of the shared job
    int64_t sums0 = 0;       // first partial sum
    PartialSums layout{};
  };
  std::vector<Member> members;
  int64_t room = 0;
  for (int64_t m = 0; m < count; ++m) {
    if (ps[m].B == 1 && ps[m].w.out > 0) {
      members.push_back({&ps[m]});
      room += 2 * ps[m].w.in + 32;  // compaction room, as column_sparse_linear
    } else {
      column_sparse_linear(ps[m], isa, 0, parallel);
    }
  }
  std::vector<int32_t> idx(static_cast<size_t>(room));
  std::vector<float> xv(static_cast<size_t>(room));
  int64_t at = 0, tasks = 0, nsums = 0;
  double values = 0.0;  // stored values the active channels read
  for (Member& mb : members) {
    const ColumnSparseProblem& p = *mb.p;
    mb.at = at;
    mb.n = k.si->compact(p.x, p.w.in, p.thr, p.thr_per_channel, idx.data() + at, xv.data() + at);
    at += 2 * p.w.in + 32;
    const int64_t cw = part_tile(p.w);
    mb.layout = part_layout(mb.n, p.w.out, cw, round64(cw));
    mb.task0 = tasks;
    mb.sums0 = nsums;
    tasks += mb.layout.parts * mb.layout.ntiles;
    nsums += mb.layout.parts * mb.layout.ntiles * mb.layout.ld;
    values += static_cast<double>(mb.n) * static_cast<double>(p.w.nnz) / static_cast<double>(max64(1, p.w.in));
  }
  std::vector<float> sums(static_cast<size_t>(nsums), 0.f);
  const ColumnSparseKernels& col = *k.col;
  parallel_for(
      tasks,
      [&](int64_t t, int) {
        size_t m = 0;
        while (m + 1 < members.size() && t >= members[m + 1].task0) ++m;
        const Member& mb = members[m];
        const ColumnSparseWeight& w = mb.p->w;
        const int32_t* mi = idx.data() + mb.at;
        const float* mx = xv.data() + mb.at;
        auto tile = [&](int64_t k0, int64_t k1, int64_t j0, int64_t c, float* a) {
          col.gemv_tile(w, mi + k0, mx + k0, k1 - k0, j0, c, a);
        };
        run_part_task(mb.layout, mb.n, w.out, t - mb.task0, sums.data() + mb.sums0, tile);
      },
      parallel && values >= kParallelMinValues);
  for (const Member& mb : members) finish_parts(*mb.p, mb.layout, sums.data() + mb.sums0);
}

void column_sparse_linear(const ColumnSparseProblem& p, Isa isa, int algo, bool parallel) {
  column_sparse_check_problem(p);
  if (algo < 0 || algo > 2) throw std::invalid_argument("algo must be 0 (auto), 1 (gemv) or 2 (gemm)");
  const ColumnSparseWeight& w = p.w;
  if (p.B == 0 || w.out == 0) return;
  const IsaKernels k = kernels(isa);
  const int64_t in = w.in;
  // compacted rows back to back (room as in sparse_input_linear)
  const int64_t cap = algo == 1 ? p.B * (in + 16) : 2 * in + 32;
  std::vector<int32_t> idx(static_cast<size_t>(cap));
  std::vector<float> xv(static_cast<size_t>(cap));
  std::vector<int64_t> n(static_cast<size_t>(p.B)), off(static_cast<size_t>(p.B) + 1, 0);
  int64_t total = 0;
  for (int64_t b = 0; b < p.B && (algo == 1 || total <= in); ++b) {
    n[b] = k.si->compact(p.x + b * in, in, p.thr, p.thr_per_channel, idx.data() + total, xv.data() + total);
    total += n[b];
    off[b + 1] = total;
  }
  const int nth = num_threads();
  if (algo == 1 || (algo == 0 && total <= in)) {
    const double density = in > 0 ? static_cast<double>(w.nnz) / static_cast<double>(in) : 0.0;
    const bool par = parallel && static_cast<double>(total) * density >= kParallelMinValues;
    if (p.B == 1) {
      gemv_parts(p, *k.col, idx.data(), xv.data(), n[0], par);
      return;
    }
    const int64_t cw = gemv_col_tile(w.out);
    const int64_t ntiles = (w.out + cw - 1) / cw;
    std::vector<float> acc(static_cast<size_t>(nth) * static_cast<size_t>(round64(cw)));
    parallel_for(
        ntiles,
        [&](int64_t t, int worker) {
          const int64_t j0 = t * cw, c = min64(cw, w.out - j0);
          float* a = acc.data() + static_cast<size_t>(worker) * static_cast<size_t>(round64(cw));
          for (int64_t b = 0; b < p.B; ++b) {
            for (int64_t j = 0; j < round64(c); ++j) a[j] = j < c ? sum_start(p, j0 + j) : 0.f;
            k.col->gemv_tile(w, idx.data() + off[b], xv.data() + off[b], n[b], j0, c, a);
            float* yb = p.y + b * w.out + j0;
            for (int64_t j = 0; j < c; ++j) yb[j] = a[j];
            finish_int8(p, yb, w.out, 1, j0, c);
          }
        },
        par);
    return;
  }
  // masked rows, then per column tile: channel blocks decoded into a dense panel, GEMM over it
  std::vector<float> xm(static_cast<size_t>(p.B * in));
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t i = 0; i < in; ++i) xm[b * in + i] = active(p, b, i) ? p.x[b * in + i] : 0.f;
  }
  const int64_t ntiles = (w.out + kColBlock - 1) / kColBlock;
  std::vector<float> panels(static_cast<size_t>(nth) * kPanelChannels * kColBlock);
  const bool par = parallel && p.B * in * w.out >= kParallelMinValues;
  parallel_for(
      ntiles,
      [&](int64_t t, int worker) {
        const int64_t j0 = t * kColBlock, c = min64(kColBlock, w.out - j0);
        float* panel = panels.data() + static_cast<size_t>(worker) * kPanelChannels * kColBlock;
        init_rows(p, j0, c);
        for (int64_t k0 = 0; k0 < in; k0 += kPanelChannels) {
          const int64_t k1 = min64(k0 + kPanelChannels, in);
          k.col->decode_panel(w, k0, k1, j0, c, panel, kColBlock);
          k.si->gemm_tile(panel, VT::f32, kColBlock, xm.data() + k0, in, p.B, 0, k1 - k0, 0, c, p.y + j0, w.out);
        }
        finish_int8(p, p.y + j0, w.out, p.B, j0, c);
      },
      par);
}

}  // namespace sf
