// Prefill attention: scalar reference (test oracle), portable tile kernel, run-time dispatch and the
// driver that transposes the keys, plans each query block's key blocks and runs the tasks.
#include "prefill_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_checks.h"
#include "prefill_attention_kernels.h"
#include "threadpool.h"

namespace sf {

namespace scalar {
SF_DEFINE_PREFILL_ATTENTION_KERNELS
}  // namespace scalar

namespace {

constexpr int64_t kColAlign = 16;  // tile columns start and end on multiples of every ISA's vector width

std::string str(int64_t v) { return std::to_string(v); }

void check(const PrefillAttnProblem& p) {
  if (p.Tq < 1) throw std::invalid_argument("prefill attention needs Tq >= 1 query rows; got Tq=" + str(p.Tq));
  check_kv_cache("prefill attention", {p.B, p.Hq, p.Hkv, p.D, p.n, p.cap}, p.Tq);  // Tq <= n <= cap
  if (p.sinks < 0 || p.last < 0 || p.window < 1 || p.horizon < 1) {
    throw std::invalid_argument("the pattern needs sinks >= 0, last >= 0, window >= 1 and horizon >= 1; got sinks=" +
                                str(p.sinks) + " window=" + str(p.window) + " last=" + str(p.last) +
                                " horizon=" + str(p.horizon));
  }
}

inline bool allowed(const PrefillAttnProblem& p, int64_t i, int64_t j) {
  return j <= i && i - j < p.horizon && (j < p.sinks || i - j < p.window || i >= p.n - p.last);
}

PrefillTileFn kernel(Isa isa, VT vt) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return vt == VT::f32 ? avx512::prefill_tile_f32 : avx512::prefill_tile_bf16;
  if (isa == Isa::avx2) return vt == VT::f32 ? avx2::prefill_tile_f32 : avx2::prefill_tile_bf16;
#endif
  (void)isa;
  return vt == VT::f32 ? scalar::prefill_tile_f32 : scalar::prefill_tile_bf16;
}

float value_at(VT vt, const void* base, int64_t i) {
  return vt == VT::f32 ? load_val<VT::f32>(base, i) : load_val<VT::bf16>(base, i);
}

// Key ranges [lo, hi) a query block (positions i0..i1) must visit, disjoint and ascending: every
// allowed key of its rows lies in one of them (at most two: the sinks, then the band to the diagonal).
int key_ranges(const PrefillAttnProblem& p, int64_t i0, int64_t i1, int64_t (*ranges)[2]) {
  const int64_t reach = max64(0, i0 - p.horizon + 1);  // the oldest key the model's sliding window lets row i0 see
  if (i1 >= p.n - p.last) {  // a row of the block attends to every earlier key
    ranges[0][0] = reach;
    ranges[0][1] = i1 + 1;
    return 1;
  }
  const int64_t band = max64(reach, i0 - p.window + 1);
  int count = 0;
  const int64_t sink_hi = min64(p.sinks, band);
  if (sink_hi > reach) {
    ranges[count][0] = reach;
    ranges[count][1] = sink_hi;
    ++count;
  }
  ranges[count][0] = band;
  ranges[count][1] = i1 + 1;
  return count + 1;
}

// The allowed keys of position i inside the key range [lo, hi), as two column spans relative to k0
// (out[0], out[1]) and (out[2], out[3]), clamped to [0, kPrefillBlock]: allowed(i, j) holds exactly
// for j in the first span (sinks) or the second (the band, or every earlier key for a last row).
void row_spans(const PrefillAttnProblem& p, int64_t i, int64_t lo, int64_t hi, int64_t k0, int32_t* out) {
  const int64_t reach = max64(lo, max64(0, i - p.horizon + 1)), end = min64(hi, i + 1);
  const int64_t band = i >= p.n - p.last ? reach : max64(reach, i - p.window + 1);
  const int64_t sink_hi = min64(p.sinks, band);
  auto rel = [&](int64_t x) { return static_cast<int32_t>(min64(kPrefillBlock, max64(0, x - k0))); };
  out[0] = rel(reach);
  out[1] = rel(max64(reach, min64(sink_hi, end)));
  out[2] = rel(band);
  out[3] = rel(max64(band, end));
}

}  // namespace

void prefill_attention_ref(const PrefillAttnProblem& p) {
  check(p);
  const int64_t G = p.Hq / p.Hkv, D = p.D;
  std::vector<float> sc(static_cast<size_t>(p.n));
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.Hq; ++h) {
      const int64_t base = (b * p.Hkv + h / G) * p.cap * D;
      for (int64_t r = 0; r < p.Tq; ++r) {
        const int64_t i = p.n - p.Tq + r;
        const float* q = p.q + ((b * p.Hq + h) * p.Tq + r) * D;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < p.n; ++j) {
          if (!allowed(p, i, j)) continue;
          float a = 0.f;
          for (int64_t d = 0; d < D; ++d) a += q[d] * value_at(p.vt, p.k, base + j * D + d);
          sc[j] = a * p.scale;
          mx = sc[j] > mx ? sc[j] : mx;
        }
        float* o = p.out + ((b * p.Tq + r) * p.Hq + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
        float sum = 0.f;
        for (int64_t j = 0; j < p.n; ++j) {
          if (!allowed(p, i, j)) continue;
          const float e = std::exp(sc[j] - mx);
          sum += e;
          for (int64_t d = 0; d < D; ++d) o[d] += e * value_at(p.vt, p.v, base + j * D + d);
        }
        for (int64_t d = 0; d < D; ++d) o[d] /= sum;
      }
    }
  }
}

void prefill_attention(const PrefillAttnProblem& p, Isa isa, bool parallel) {
  check(p);
  const PrefillTileFn fn = kernel(isa, p.vt);
  constexpr int64_t W = kPrefillBlock;
  const int64_t G = p.Hq / p.Hkv, D = p.D, BHkv = p.B * p.Hkv, BHq = p.B * p.Hq;
  // rows per task: a key block is read once per task, so a dense (or wide) pattern takes many rows to
  // cut the key/value traffic; a narrow band takes few, each row block's band being window + R keys
  const int64_t R = p.window >= p.n / 2 ? kPrefillRows : kPrefillBandRows;
  const int64_t nkb = (p.n + W - 1) / W, nqb = (p.Tq + R - 1) / R;
  const size_t elt = p.vt == VT::f32 ? 4 : 2;

  // keys transposed per block: kt[(bh * nkb + kb) * D * W + d * W + c] = k[bh, kb * W + c, d], 0 past n
  std::unique_ptr<float[]> kt(new float[static_cast<size_t>(BHkv * nkb * D * W)]);
  parallel_for(
      BHkv * nkb,
      [&](int64_t task, int) {
        const int64_t bh = task / nkb, kb = task % nkb, t0 = kb * W, nt = min64(W, p.n - t0);
        float* dst = kt.get() + task * D * W;
        const int64_t src = (bh * p.cap + t0) * D;
        for (int64_t c = 0; c < nt; ++c)
          for (int64_t d = 0; d < D; ++d) dst[d * W + c] = value_at(p.vt, p.k, src + c * D + d);
        for (int64_t d = 0; d < D; ++d)
          for (int64_t c = nt; c < W; ++c) dst[d * W + c] = 0.f;
      },
      parallel && BHkv * nkb > 1);

  // per worker: scaled queries, scores, mask, running max / sum, output accumulators
  const int nthreads = num_threads();
  const int64_t per_worker = R * D + R * W + 2 * R + R * D;
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(nthreads * per_worker)]);
  std::unique_ptr<int32_t[]> spans(new int32_t[static_cast<size_t>(nthreads * 4 * R)]);
  const int64_t offset = p.n - p.Tq;  // position of query row 0
  const bool par = parallel && BHq * nqb > 1 && p.Tq * p.n * D >= (int64_t{1} << 16);
  parallel_for(
      BHq * nqb,
      [&](int64_t task, int worker) {
        const int64_t qb = nqb - 1 - task / BHq, bh = task % BHq;  // the last (costliest) query blocks first
        const int64_t b = bh / p.Hq, h = bh % p.Hq, bkv = b * p.Hkv + h / G;
        const int64_t r0 = qb * R, rows = min64(R, p.Tq - r0), i0 = offset + r0, i1 = i0 + rows - 1;
        float* qs = scratch.get() + worker * per_worker;
        float* s = qs + R * D;
        float* m = s + R * W;
        float* l = m + R;
        float* acc = l + R;
        int32_t* span = spans.get() + worker * 4 * R;
        const float* qsrc = p.q + (bh * p.Tq + r0) * D;
        for (int64_t x = 0; x < rows * D; ++x) qs[x] = qsrc[x] * p.scale;
        for (int64_t r = 0; r < rows; ++r) {
          m[r] = -std::numeric_limits<float>::infinity();
          l[r] = 0.f;
        }
        for (int64_t x = 0; x < rows * D; ++x) acc[x] = 0.f;
        PrefillTile t;
        t.qs = qs;
        t.v = static_cast<const char*>(p.v) + static_cast<size_t>(bkv * p.cap * D) * elt;
        t.rows = rows;
        t.D = D;
        t.s = s;
        t.m = m;
        t.l = l;
        t.acc = acc;
        int64_t ranges[2][2];
        const int nr = key_ranges(p, i0, i1, ranges);
        for (int ri = 0; ri < nr; ++ri) {
          const int64_t lo = ranges[ri][0], hi = ranges[ri][1];
          for (int64_t kb = lo / W; kb * W < hi; ++kb) {
            const int64_t k0 = kb * W;
            const int64_t j0 = max64(lo, k0), j1 = min64(hi, k0 + W);  // the range's keys in this block
            t.k0 = k0;
            t.c0 = (j0 - k0) / kColAlign * kColAlign;
            t.c1 = min64(W, (j1 - k0 + kColAlign - 1) / kColAlign * kColAlign);
            t.kv_cols = min64(t.c1, p.n - k0);
            t.kt = kt.get() + (bkv * nkb + kb) * D * W;
            // the tile is entirely allowed when its columns lie in the range and every (row, key) passes
            const int64_t a = k0 + t.c0, e = k0 + t.c1;  // keys [a, e)
            const bool full = a >= lo && e <= hi && e - 1 <= i0 && i1 - a < p.horizon &&
                              (e <= p.sinks || i1 - a < p.window || i0 >= p.n - p.last);
            if (full) {
              t.span = nullptr;
            } else {
              for (int64_t r = 0; r < rows; ++r) row_spans(p, i0 + r, lo, hi, k0, span + 4 * r);
              t.span = span;
            }
            fn(t);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* o = p.out + ((b * p.Tq + r0 + r) * p.Hq + h) * D;
          const float inv = 1.f / l[r];
          for (int64_t d = 0; d < D; ++d) o[d] = acc[r * D + d] * inv;
        }
      },
      par);
}

}  // namespace sf
