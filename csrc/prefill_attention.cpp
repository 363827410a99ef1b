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
#include "linear_bf16.h"
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

// The query block of a task: tasks run the last (costliest) query blocks first, every head of one
// block before the next; query head h of sequence b, its KV head bkv, rows [r0, r0 + rows) of Tq.
struct QueryBlock {
  int64_t b, h, bkv, r0, rows;
};

QueryBlock query_block(const PrefillAttnProblem& p, int64_t task, int64_t R, int64_t nqb) {
  const int64_t BHq = p.B * p.Hq, qb = nqb - 1 - task / BHq, bh = task % BHq;
  const int64_t b = bh / p.Hq, h = bh % p.Hq, r0 = qb * R;
  return {b, h, b * p.Hkv + h / (p.Hq / p.Hkv), r0, min64(R, p.Tq - r0)};
}

// the online softmax state of `rows` rows before their first key block
void start_rows(float* m, float* l, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
}

// out[b, r0 + r, h] = acc[r] / l[r] for the block's rows (acc rows lda floats apart)
void finish_rows(const PrefillAttnProblem& p, const QueryBlock& qb, const float* acc, int64_t lda, const float* l) {
  for (int64_t r = 0; r < qb.rows; ++r) {
    float* o = p.out + ((qb.b * p.Tq + qb.r0 + r) * p.Hq + qb.h) * p.D;
    const float inv = 1.f / l[r];
    for (int64_t d = 0; d < p.D; ++d) o[d] = acc[r * lda + d] * inv;
  }
}

// Calls tile(kb, k0, c0, c1, kv_cols, span) for every key block a query block visits (rows
// [0, rows) at positions i0 .. i0 + rows - 1): columns [c0, c1) of block kb (first key k0), c0 and c1
// multiples of `align`; kv_cols = min(c1, n - k0); span: the rows' allowed column spans
// (PrefillTile::span, written into `span`), or null when every (row, column) of the tile is allowed.
template <class Tile>
void walk_tiles(const PrefillAttnProblem& p, int64_t i0, int64_t rows, int64_t align, int32_t* span, Tile&& tile) {
  constexpr int64_t W = kPrefillBlock;
  const int64_t i1 = i0 + rows - 1;
  int64_t ranges[2][2];
  const int nr = key_ranges(p, i0, i1, ranges);
  for (int ri = 0; ri < nr; ++ri) {
    const int64_t lo = ranges[ri][0], hi = ranges[ri][1];
    for (int64_t kb = lo / W; kb * W < hi; ++kb) {
      const int64_t k0 = kb * W;
      const int64_t j0 = max64(lo, k0), j1 = min64(hi, k0 + W);  // the range's keys in this block
      const int64_t c0 = (j0 - k0) / align * align;
      const int64_t c1 = min64(W, (j1 - k0 + align - 1) / align * align);
      // the tile is entirely allowed when its columns lie in the range and every (row, key) passes
      const int64_t a = k0 + c0, e = k0 + c1;  // keys [a, e)
      const bool full = a >= lo && e <= hi && e - 1 <= i0 && i1 - a < p.horizon &&
                        (e <= p.sinks || i1 - a < p.window || i0 >= p.n - p.last);
      if (!full) {
        for (int64_t r = 0; r < rows; ++r) row_spans(p, i0 + r, lo, hi, k0, span + 4 * r);
      }
      tile(kb, k0, c0, c1, min64(c1, p.n - k0), full ? nullptr : span);
    }
  }
}

PrefillBf16TileFn bf16_kernel(Bf16Path path) {
#if defined(SF_HAVE_AMX_KERNELS)
  if (path == Bf16Path::amx) return amx::prefill_tile_bf16_compute;
#endif
#if defined(SF_HAVE_BF16_KERNELS)
  if (path == Bf16Path::avx512_bf16) return avx512bf16::prefill_tile_bf16_compute;
#endif
  throw std::invalid_argument(std::string("bf16 path ") + bf16_path_name(path) + " has no prefill-attention kernel in this build");
}

// prefill_attention with bf16 compute (prefill_attention.h, PrefillBf16Tile): keys and values packed
// into pairs per block, then the same tasks as the float32 driver
void prefill_attention_bf16(const PrefillAttnProblem& p, PrefillBf16TileFn fn, bool parallel) {
  constexpr int64_t W = kPrefillBlock, G = kPrefillBf16Group;
  const int64_t D = p.D, BHkv = p.B * p.Hkv, BHq = p.B * p.Hq;
  const int64_t Dp = (D + 31) / 32 * 32, Dv = (D + 15) / 16 * 16;
  const int64_t R = p.window >= p.n / 2 ? kPrefillRows : kPrefillBandRows;
  const int64_t nkb = (p.n + W - 1) / W, nqb = (p.Tq + R - 1) / R;
  const int64_t kblock = Dp / 2 * W, vblock = W / 2 * Dv;  // dwords per packed key / value block
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* v = static_cast<const uint16_t*>(p.v);

  std::unique_ptr<uint32_t[]> kp(new uint32_t[static_cast<size_t>(BHkv * nkb * kblock)]);
  std::unique_ptr<uint32_t[]> vp(new uint32_t[static_cast<size_t>(BHkv * nkb * vblock)]);
  parallel_for(
      BHkv * nkb,
      [&](int64_t task, int) {
        const int64_t bh = task / nkb, kb = task % nkb, t0 = kb * W, nt = min64(W, p.n - t0);
        const uint16_t* ks = k + (bh * p.cap + t0) * D;
        const uint16_t* vs = v + (bh * p.cap + t0) * D;
        auto at = [&](const uint16_t* src, int64_t c, int64_t d) -> uint32_t {
          return c < nt && d < D ? src[c * D + d] : 0u;
        };
        uint32_t* kd = kp.get() + task * kblock;  // (Dp / 2, W): (k[c, 2d], k[c, 2d + 1])
        for (int64_t c = 0; c < W; ++c)
          for (int64_t d = 0; d < Dp / 2; ++d) kd[d * W + c] = at(ks, c, 2 * d) | at(ks, c, 2 * d + 1) << 16;
        uint32_t* vd = vp.get() + task * vblock;  // (W / 2, Dv): (v[2c, d], v[2c + 1, d])
        for (int64_t c = 0; c < W / 2; ++c)
          for (int64_t d = 0; d < Dv; ++d) vd[c * Dv + d] = at(vs, 2 * c, d) | at(vs, 2 * c + 1, d) << 16;
      },
      parallel && BHkv * nkb > 1);

  const int64_t Rp = (R + 15) / 16 * 16;
  const int nthreads = num_threads();
  // per worker, in bytes: queries, scores, probabilities, running max / sum, accumulators, spans
  const int64_t qb_bytes = Rp * Dp * 2, s_bytes = 2 * G * W * 4, pb_bytes = G * W * 2, ml_bytes = 2 * R * 4,
                acc_bytes = Rp * Dv * 4, span_bytes = 4 * R * 4;
  const int64_t per_worker = (qb_bytes + s_bytes + pb_bytes + ml_bytes + acc_bytes + span_bytes + 63) / 64 * 64;
  std::unique_ptr<uint64_t[]> scratch(new uint64_t[static_cast<size_t>(nthreads * per_worker / 8)]);
  const int64_t offset = p.n - p.Tq;
  const bool par = parallel && BHq * nqb > 1 && p.Tq * p.n * D >= (int64_t{1} << 16);
  // the tile wants scale > 0: a negative scale negates the queries (exact), scale 0 zeroes them
  // (uniform weights over the allowed keys)
  const float qsign = p.scale > 0.f ? 1.f : p.scale < 0.f ? -1.f : 0.f;
  const float tile_scale = p.scale == 0.f ? 1.f : std::fabs(p.scale);
  parallel_for(
      BHq * nqb,
      [&](int64_t task, int worker) {
        const QueryBlock qblk = query_block(p, task, R, nqb);
        const int64_t bkv = qblk.bkv, r0 = qblk.r0, rows = qblk.rows, rows16 = (rows + 15) / 16 * 16;
        char* base = reinterpret_cast<char*>(scratch.get()) + worker * per_worker;
        PrefillBf16Tile t;
        uint16_t* qb = reinterpret_cast<uint16_t*>(base);
        float* s = reinterpret_cast<float*>(base + qb_bytes);
        uint16_t* pb = reinterpret_cast<uint16_t*>(base + qb_bytes + s_bytes);
        float* m = reinterpret_cast<float*>(base + qb_bytes + s_bytes + pb_bytes);
        float* l = m + R;
        float* acc = l + R;
        int32_t* span = reinterpret_cast<int32_t*>(acc + Rp * Dv);
        const float* qsrc = p.q + ((qblk.b * p.Hq + qblk.h) * p.Tq + r0) * D;
        for (int64_t r = 0; r < rows16; ++r)
          for (int64_t d = 0; d < Dp; ++d) qb[r * Dp + d] = r < rows && d < D ? f32_to_bf16(qsrc[r * D + d] * qsign) : uint16_t{0};
        std::memset(pb, 0, static_cast<size_t>(pb_bytes));
        std::memset(acc, 0, static_cast<size_t>(rows16 * Dv * 4));
        start_rows(m, l, rows);
        t.qb = qb;
        t.rows = rows;
        t.Dp = Dp;
        t.Dv = Dv;
        t.scale = tile_scale;
        t.s = s;
        t.pb = pb;
        t.m = m;
        t.l = l;
        t.acc = acc;
        walk_tiles(p, offset + r0, rows, kPrefillBf16Align, span,
                   [&](int64_t kb, int64_t, int64_t c0, int64_t c1, int64_t, const int32_t* sp) {
                     t.kp = kp.get() + (bkv * nkb + kb) * kblock;
                     t.vp = vp.get() + (bkv * nkb + kb) * vblock;
                     t.c0 = c0;
                     t.c1 = c1;
                     t.span = sp;
                     fn(t);
                   });
        finish_rows(p, qblk, acc, Dv, l);
      },
      par);
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
  const int64_t D = p.D, BHkv = p.B * p.Hkv, BHq = p.B * p.Hq;
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
        const QueryBlock qblk = query_block(p, task, R, nqb);
        const int64_t bkv = qblk.bkv, r0 = qblk.r0, rows = qblk.rows, i0 = offset + r0;
        float* qs = scratch.get() + worker * per_worker;
        float* s = qs + R * D;
        float* m = s + R * W;
        float* l = m + R;
        float* acc = l + R;
        int32_t* span = spans.get() + worker * 4 * R;
        const float* qsrc = p.q + ((qblk.b * p.Hq + qblk.h) * p.Tq + r0) * D;
        for (int64_t x = 0; x < rows * D; ++x) qs[x] = qsrc[x] * p.scale;
        start_rows(m, l, rows);
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
        walk_tiles(p, i0, rows, kColAlign, span,
                   [&](int64_t kb, int64_t k0, int64_t c0, int64_t c1, int64_t kv_cols, const int32_t* sp) {
                     t.k0 = k0;
                     t.c0 = c0;
                     t.c1 = c1;
                     t.kv_cols = kv_cols;
                     t.kt = kt.get() + (bkv * nkb + kb) * D * W;
                     t.span = sp;
                     fn(t);
                   });
        finish_rows(p, qblk, acc, D, l);
      },
      par);
}

void prefill_attention(const PrefillAttnProblem& p, Isa isa, Bf16Path path, bool parallel) {
  if (p.vt != VT::bf16 || path == Bf16Path::scalar) {
    prefill_attention(p, isa, parallel);
    return;
  }
  check(p);
  if (!bf16_path_supported(path)) {
    throw std::invalid_argument(std::string("bf16 path ") + bf16_path_name(path) + " is not available on this machine");
  }
  prefill_attention_bf16(p, bf16_kernel(path), parallel);
}

}  // namespace sf
