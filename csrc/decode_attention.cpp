// Decode attention: scalar reference (test oracle), portable chunk kernel, run-time dispatch and the
// driver that cuts the selected spans into chunks, runs them on the thread pool and merges them.
#include "decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_checks.h"
#include "isa.h"
#include "decode_attention_kernels.h"
#include "threadpool.h"

namespace sf {

namespace scalar {
SF_DEFINE_DECODE_ATTENTION_KERNELS
}  // namespace scalar

namespace {

constexpr int64_t kDefaultChunk = 512;  // tokens per task
// compressed tokens per task: a chunk's first block is read without a prefetch ahead of it, and the
// compressed kernel is the slower per token, so fewer, longer chunks (32K float32 tokens, 2 threads: ~5%)
constexpr int64_t kSparseChunk = 2048;

std::string str(int64_t v) { return std::to_string(v); }

// Checks the sizes and every span; returns the tokens selected per (b, KV head) (B * Hkv,).
std::vector<int64_t> check(const DecodeAttnProblem& p) {
  check_kv_cache("decode attention", {p.B, p.Hq, p.Hkv, p.D, p.n, p.cap}, 1);
  if (p.S < 1) throw std::invalid_argument("decode attention needs S >= 1 spans per (batch, kv head); got S=" + str(p.S));
  std::vector<int64_t> selected(static_cast<size_t>(p.B * p.Hkv), 0);
  for (int64_t bh = 0; bh < p.B * p.Hkv; ++bh) {
    int64_t end = 0;
    for (int64_t s = 0; s < p.S; ++s) {
      const int64_t start = p.spans[(bh * p.S + s) * 2], len = p.spans[(bh * p.S + s) * 2 + 1];
      if (len == 0) continue;
      if (len < 0 || start < end || start + len > p.n) {
        throw std::invalid_argument("span [" + str(start) + ", +" + str(len) + ") of (batch " + str(bh / p.Hkv) +
                                    ", kv head " + str(bh % p.Hkv) + ") must be ascending, disjoint and inside [0, " +
                                    str(p.n) + ")");
      }
      end = start + len;
      selected[bh] += len;
    }
    if (selected[bh] == 0) {
      throw std::invalid_argument("no token selected for (batch " + str(bh / p.Hkv) + ", kv head " + str(bh % p.Hkv) + ")");
    }
  }
  return selected;
}

}  // namespace

AttnChunkFn attn_chunk_kernel(Isa isa, VT vt) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return vt == VT::f32 ? avx512::attn_chunk_f32 : avx512::attn_chunk_bf16;
  if (isa == Isa::avx2) return vt == VT::f32 ? avx2::attn_chunk_f32 : avx2::attn_chunk_bf16;
#endif
  (void)isa;
  return vt == VT::f32 ? scalar::attn_chunk_f32 : scalar::attn_chunk_bf16;
}

PageScoreFn page_score_kernel(Isa isa, VT vt) {
#if defined(SF_HAVE_X86_KERNELS)
  if (isa == Isa::avx512) return vt == VT::f32 ? avx512::page_score_f32 : avx512::page_score_bf16;
  if (isa == Isa::avx2) return vt == VT::f32 ? avx2::page_score_f32 : avx2::page_score_bf16;
#endif
  (void)isa;
  return vt == VT::f32 ? scalar::page_score_f32 : scalar::page_score_bf16;
}

namespace {

void check_select(const QuestSelectProblem& p) {
  check_kv_cache("Quest selection (n: pages, cap: allocated pages)", {p.B, p.Hq, p.Hkv, p.D, p.pages, p.pcap}, 0);
  if (p.keep < 0 || p.keep > p.pages) {
    throw std::invalid_argument("Quest selection needs 0 <= keep <= pages; got keep=" + str(p.keep) +
                                " pages=" + str(p.pages));
  }
}

// chosen[0:keep] = the keep highest scores (ties: lower page), ascending page order
void top_pages(std::vector<float>& score, std::vector<int32_t>& idx, int64_t keep, int32_t* chosen) {
  const int64_t n = static_cast<int64_t>(score.size());
  idx.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) idx[i] = static_cast<int32_t>(i);
  auto better = [&](int32_t a, int32_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); };
  if (keep < n) std::nth_element(idx.begin(), idx.begin() + keep, idx.end(), better);
  std::sort(idx.begin(), idx.begin() + keep);
  for (int64_t i = 0; i < keep; ++i) chosen[i] = idx[i];
}

float value_at(VT vt, const void* base, int64_t i) {
  return vt == VT::f32 ? load_val<VT::f32>(base, i) : load_val<VT::bf16>(base, i);
}

}  // namespace

void merge_chunks(const float* pm, const float* pl, const float* pacc, const std::vector<int64_t>& head_first, int64_t G,
                  int64_t D, float* out, float* lse) {
  const int64_t BH = static_cast<int64_t>(head_first.size()) - 1;
  for (int64_t bh = 0; bh < BH; ++bh) {
    for (int64_t g = 0; g < G; ++g) {
      float M = -std::numeric_limits<float>::infinity();
      for (int64_t ci = head_first[bh]; ci < head_first[bh + 1]; ++ci) M = pm[ci * G + g] > M ? pm[ci * G + g] : M;
      float* o = out + (bh * G + g) * D;  // query head h = kvh * G + g of batch b: (b * Hq + h) = bh * G + g
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      float L = 0.f;
      for (int64_t ci = head_first[bh]; ci < head_first[bh + 1]; ++ci) {
        const float w = head_first[bh + 1] - head_first[bh] == 1 ? 1.f : std::exp(pm[ci * G + g] - M);
        L += w * pl[ci * G + g];
        const float* a = pacc + (ci * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      const float inv = 1.f / L;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      if (lse) lse[bh * G + g] = M + std::log(L);
    }
  }
}

void decode_attention_ref(const DecodeAttnProblem& p) {
  check(p);
  const int64_t G = p.Hq / p.Hkv, D = p.D;
  std::vector<float> sc;
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.Hq; ++h) {
      const int64_t kvh = h / G, bh = b * p.Hkv + kvh, base = bh * p.cap * D;
      const float* q = p.q + (b * p.Hq + h) * D;
      float* o = p.out + (b * p.Hq + h) * D;
      sc.clear();
      std::vector<int64_t> toks;
      for (int64_t s = 0; s < p.S; ++s) {
        const int64_t start = p.spans[(bh * p.S + s) * 2], len = p.spans[(bh * p.S + s) * 2 + 1];
        for (int64_t t = start; t < start + len; ++t) {
          float a = 0.f;
          for (int64_t d = 0; d < D; ++d) a += q[d] * value_at(p.vt, p.k, base + t * D + d);
          sc.push_back(a * p.scale);
          toks.push_back(t);
        }
      }
      float mx = -std::numeric_limits<float>::infinity();
      for (float v : sc) mx = v > mx ? v : mx;
      float sum = 0.f;
      for (float& v : sc) {
        v = std::exp(v - mx);
        sum += v;
      }
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (size_t i = 0; i < sc.size(); ++i) {
        for (int64_t d = 0; d < D; ++d) o[d] += sc[i] * value_at(p.vt, p.v, base + toks[i] * D + d);
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= sum;
      if (p.lse) p.lse[b * p.Hq + h] = mx + std::log(sum);
    }
  }
}

void decode_attention(const DecodeAttnProblem& p, Isa isa, int64_t chunk, bool parallel) {
  const std::vector<int64_t> selected = check(p);
  const AttnChunkFn fn = attn_chunk_kernel(isa, p.vt);
  const int64_t G = p.Hq / p.Hkv, D = p.D, BH = p.B * p.Hkv;
  const int64_t ct = chunk > 0 ? chunk : kDefaultChunk;
  // Chunks: consecutive pieces of the selected spans of one (b, KV head), ct tokens each (the last
  // of a head may be shorter). pieces (np, 2) in chunk order; chunk c owns pieces [first[c], first[c + 1]).
  std::vector<int32_t> pieces;
  std::vector<int64_t> first, owner;  // owner: (b, KV head) of each chunk
  std::vector<int64_t> head_first(static_cast<size_t>(BH) + 1, 0);
  for (int64_t bh = 0; bh < BH; ++bh) {
    head_first[bh] = static_cast<int64_t>(owner.size());
    int64_t room = 0;  // tokens left in the current chunk
    for (int64_t s = 0; s < p.S; ++s) {
      int64_t start = p.spans[(bh * p.S + s) * 2], len = p.spans[(bh * p.S + s) * 2 + 1];
      while (len > 0) {
        if (room == 0) {
          first.push_back(static_cast<int64_t>(pieces.size() / 2));
          owner.push_back(bh);
          room = ct;
        }
        const int64_t take = min64(room, len);
        pieces.push_back(static_cast<int32_t>(start));
        pieces.push_back(static_cast<int32_t>(take));
        start += take;
        len -= take;
        room -= take;
      }
    }
  }
  head_first[BH] = static_cast<int64_t>(owner.size());
  const int64_t nc = static_cast<int64_t>(owner.size());
  first.push_back(static_cast<int64_t>(pieces.size() / 2));

  // scaled queries (B * Hkv, G, D); partial results per chunk
  std::unique_ptr<float[]> qs(new float[p.B * p.Hq * D]);
  for (int64_t i = 0; i < p.B * p.Hq * D; ++i) qs[i] = p.q[i] * p.scale;
  std::unique_ptr<float[]> pm(new float[nc * G]), pl(new float[nc * G]), pacc(new float[nc * G * D]);
  const int nthreads = num_threads();
  std::unique_ptr<float[]> scratch(new float[static_cast<int64_t>(nthreads) * G * kAttnBlock]);
  const size_t elt = p.vt == VT::f32 ? 4 : 2;
  int64_t total = 0;
  for (int64_t v : selected) total += v;
  const bool par = parallel && nc > 1 && total * G * D >= (int64_t{1} << 14);
  parallel_for(
      nc,
      [&](int64_t ci, int worker) {
        const int64_t bh = owner[ci];
        AttnChunk c;
        c.q = qs.get() + bh * G * D;
        c.k = static_cast<const char*>(p.k) + static_cast<size_t>(bh * p.cap * D) * elt;
        c.v = static_cast<const char*>(p.v) + static_cast<size_t>(bh * p.cap * D) * elt;
        c.G = G;
        c.D = D;
        c.pieces = pieces.data() + 2 * first[ci];
        c.np = first[ci + 1] - first[ci];
        c.m = pm.get() + ci * G;
        c.l = pl.get() + ci * G;
        c.acc = pacc.get() + ci * G * D;
        c.scratch = scratch.get() + static_cast<int64_t>(worker) * G * kAttnBlock;
        fn(c);
      },
      par);
  merge_chunks(pm.get(), pl.get(), pacc.get(), head_first, G, D, p.out, p.lse);
}

void quest_select_ref(const QuestSelectProblem& p) {
  check_select(p);
  const int64_t G = p.Hq / p.Hkv, D = p.D;
  std::vector<float> score;
  std::vector<int32_t> idx;
  for (int64_t bh = 0; bh < p.B * p.Hkv; ++bh) {
    score.assign(static_cast<size_t>(p.pages), 0.f);
    for (int64_t pg = 0; pg < p.pages; ++pg) {
      const int64_t r0 = (bh * p.pcap + pg) * D;
      float s = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const float* q = p.q + (bh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) {
          const float hi = q[d] * value_at(p.vt, p.kmax, r0 + d), lo = q[d] * value_at(p.vt, p.kmin, r0 + d);
          s += hi > lo ? hi : lo;
        }
      }
      score[pg] = s;
    }
    top_pages(score, idx, p.keep, p.chosen + bh * p.keep);
  }
}

void quest_select(const QuestSelectProblem& p, Isa isa, bool parallel) {
  check_select(p);
  const PageScoreFn fn = page_score_kernel(isa, p.vt);
  const int64_t G = p.Hq / p.Hkv, D = p.D, BH = p.B * p.Hkv;
  const size_t elt = p.vt == VT::f32 ? 4 : 2;
  parallel_for(
      BH,
      [&](int64_t bh, int) {
        std::vector<float> qpos(static_cast<size_t>(D), 0.f), qneg(static_cast<size_t>(D), 0.f);
        for (int64_t g = 0; g < G; ++g) {
          const float* q = p.q + (bh * G + g) * D;
          for (int64_t d = 0; d < D; ++d) (q[d] > 0.f ? qpos : qneg)[d] += q[d];
        }
        std::vector<float> score(static_cast<size_t>(p.pages));
        std::vector<int32_t> idx;
        const size_t off = static_cast<size_t>(bh * p.pcap * D) * elt;
        fn(qpos.data(), qneg.data(), static_cast<const char*>(p.kmin) + off, static_cast<const char*>(p.kmax) + off,
           p.pages, D, score.data());
        top_pages(score, idx, p.keep, p.chosen + bh * p.keep);
      },
      parallel && BH > 1 && p.pages * D * G >= 4096);
}

namespace {

SparseChunkFn sparse_kernel(Isa isa, VT vt) {
#if defined(SF_HAVE_X86_KERNELS)
#if defined(SF_HAVE_VBMI2_KERNELS)
  if (isa == Isa::avx512 && vt == VT::bf16 && use_avx512_vbmi2()) return avx512vbmi2::sparse_chunk_bf16;
#endif
  if (isa == Isa::avx512) return vt == VT::f32 ? avx512::sparse_chunk_f32 : avx512::sparse_chunk_bf16;
  if (isa == Isa::avx2) return vt == VT::f32 ? avx2::sparse_chunk_f32 : avx2::sparse_chunk_bf16;
#endif
  (void)isa;
  return vt == VT::f32 ? scalar::sparse_chunk_f32 : scalar::sparse_chunk_bf16;
}

void check_sparse_sizes(const SparseKvProblem& p) {
  check_kv_cache("compressed KV attention", {p.B, p.Hq, p.Hkv, p.D, p.n, p.cap}, 1);
  if (p.keep < 1 || p.keep > p.D) {
    throw std::invalid_argument("compressed KV attention needs 1 <= keep <= D; got keep=" + str(p.keep) + " D=" + str(p.D));
  }
  if (p.k && (!p.v || p.r0 < 0 || p.r0 > p.r1 || p.r1 > p.kcap)) {
    throw std::invalid_argument("compressed KV attention: the dense tokens [" + str(p.r0) + ", " + str(p.r1) +
                                ") must lie in [0, " + str(p.kcap) + ") of k and v");
  }
}

[[noreturn]] void bad_bitmap(const SparseKvProblem& p, int64_t bh, int64_t t, int which) {
  throw std::invalid_argument(std::string(which ? "value" : "key") + " bitmap of token " + str(t) + " (batch " +
                              str(bh / p.Hkv) + ", kv head " + str(bh % p.Hkv) + ") must mark exactly keep=" +
                              str(p.keep) + " of the " + str(p.D) + " channels");
}

void check_sparse(const SparseKvProblem& p) {
  const int64_t W = (p.D + 63) / 64;
  check_sparse_sizes(p);
  for (int64_t bh = 0; bh < p.B * p.Hkv; ++bh) {
    for (int64_t t = 0; t < p.n; ++t) {
      for (int which = 0; which < 2; ++which) {
        const uint64_t* bits = (which ? p.vbits : p.kbits) + (bh * p.cap + t) * W;
        int64_t count = 0;
        bool beyond = false;  // a bit past channel D - 1
        for (int64_t w = 0; w < W; ++w) {
          count += __builtin_popcountll(bits[w]);
          const int64_t valid = p.D - 64 * w;
          beyond = beyond || (valid < 64 && (bits[w] >> valid) != 0);
        }
        if (count != p.keep || beyond) bad_bitmap(p, bh, t, which);
      }
    }
  }
}

}  // namespace

void sparse_kv_attention_ref(const SparseKvProblem& p) {
  check_sparse(p);
  const int64_t G = p.Hq / p.Hkv, D = p.D, W = (D + 63) / 64, nr = p.k ? p.r1 - p.r0 : 0;
  std::vector<float> krow(static_cast<size_t>(D)), sc, vsum(static_cast<size_t>(D));
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.Hq; ++h) {
      const int64_t bh = b * p.Hkv + h / G;
      const float* q = p.q + (b * p.Hq + h) * D;
      auto expand = [&](const void* vals, const uint64_t* bits, int64_t t, std::vector<float>& row) {
        for (int64_t d = 0; d < D; ++d) row[d] = 0.f;
        int64_t i = (bh * p.cap + t) * p.keep;
        for (int64_t d = 0; d < D; ++d)
          if ((bits[(bh * p.cap + t) * W + d / 64] >> (d % 64)) & 1) row[d] = value_at(p.vt, vals, i++);
      };
      // token t < n: compressed t; n <= t < n + nr: dense r0 + t - n
      auto dense = [&](const void* kv, int64_t t, std::vector<float>& row) {
        for (int64_t d = 0; d < D; ++d) row[d] = value_at(p.vt, kv, (bh * p.kcap + p.r0 + t - p.n) * D + d);
      };
      const int64_t total = p.n + nr;
      sc.assign(static_cast<size_t>(total), 0.f);
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < total; ++t) {
        if (t < p.n) expand(p.kvals, p.kbits, t, krow); else dense(p.k, t, krow);
        float a = 0.f;
        for (int64_t d = 0; d < D; ++d) a += q[d] * krow[d];
        sc[t] = a * p.scale;
        mx = sc[t] > mx ? sc[t] : mx;
      }
      float sum = 0.f;
      float* o = p.out + (b * p.Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t t = 0; t < total; ++t) {
        const float e = std::exp(sc[t] - mx);
        sum += e;
        if (t < p.n) expand(p.vvals, p.vbits, t, vsum); else dense(p.v, t, vsum);
        for (int64_t d = 0; d < D; ++d) o[d] += e * vsum[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= sum;
      if (p.lse) p.lse[b * p.Hq + h] = mx + std::log(sum);
    }
  }
}

void sparse_kv_attention(const SparseKvProblem& p, Isa isa, int64_t chunk, bool parallel) {
  check_sparse_sizes(p);  // each chunk checks its tokens' bitmaps before reading their values
  const SparseChunkFn fn = sparse_kernel(isa, p.vt);
  const AttnChunkFn dense_fn = attn_chunk_kernel(isa, p.vt);
  const int64_t G = p.Hq / p.Hkv, D = p.D, BH = p.B * p.Hkv, W = (D + 63) / 64;
  const int64_t ct = chunk > 0 ? chunk : kSparseChunk;
  // chunks of each (b, KV head): the compressed tokens, ct at a time, then the dense tokens (if any),
  // kDefaultChunk at a time; recent (rc, 2): the dense chunks' [start, length), the same for every head
  const int64_t per_sparse = (p.n + ct - 1) / ct, nr = p.k ? p.r1 - p.r0 : 0;
  const int64_t rct = chunk > 0 ? chunk : kDefaultChunk, rc = (nr + rct - 1) / rct;
  const int64_t per_head = per_sparse + rc, nc = BH * per_head;
  std::vector<int32_t> recent(static_cast<size_t>(2 * rc));
  for (int64_t i = 0; i < rc; ++i) {
    recent[2 * i] = static_cast<int32_t>(p.r0 + i * rct);
    recent[2 * i + 1] = static_cast<int32_t>(min64(rct, nr - i * rct));
  }
  std::vector<int64_t> head_first(static_cast<size_t>(BH) + 1);
  for (int64_t bh = 0; bh <= BH; ++bh) head_first[bh] = bh * per_head;
  std::unique_ptr<float[]> qs(new float[p.B * p.Hq * D]);
  for (int64_t i = 0; i < p.B * p.Hq * D; ++i) qs[i] = p.q[i] * p.scale;
  std::unique_ptr<float[]> pm(new float[nc * G]), pl(new float[nc * G]), pacc(new float[nc * G * D]);
  const int nthreads = num_threads();
  const int64_t per_worker = G * kAttnBlock + 2 * kAttnBlock * D + G * D;  // scores, expanded key and value rows, query rows
  std::unique_ptr<float[]> scratch(new float[static_cast<int64_t>(nthreads) * per_worker]);
  const size_t elt = p.vt == VT::f32 ? 4 : 2;
  std::vector<int64_t> bad(static_cast<size_t>(nc), -1);  // per chunk: 2 t + (value bitmap) of a bad token, or -1
  parallel_for(
      nc,
      [&](int64_t ci, int worker) {
        const int64_t bh = ci / per_head, part = ci % per_head;
        float* mine = scratch.get() + static_cast<int64_t>(worker) * per_worker;
        AttnChunk a;
        a.q = qs.get() + bh * G * D;
        a.G = G;
        a.D = D;
        a.m = pm.get() + ci * G;
        a.l = pl.get() + ci * G;
        a.acc = pacc.get() + ci * G * D;
        a.scratch = mine;
        if (part >= per_sparse) {  // dense tokens of the recent window
          a.k = static_cast<const char*>(p.k) + static_cast<size_t>(bh * p.kcap * D) * elt;
          a.v = static_cast<const char*>(p.v) + static_cast<size_t>(bh * p.kcap * D) * elt;
          a.pieces = recent.data() + 2 * (part - per_sparse);
          a.np = 1;
          dense_fn(a);
          return;
        }
        SparseKvChunk c;
        c.base = a;
        c.bad = &bad[ci];
        c.kbuf = mine + G * kAttnBlock;
        c.vbuf = c.kbuf + kAttnBlock * D;
        c.qbuf = c.vbuf + kAttnBlock * D;
        c.kvals = static_cast<const char*>(p.kvals) + static_cast<size_t>(bh * p.cap * p.keep) * elt;
        c.vvals = static_cast<const char*>(p.vvals) + static_cast<size_t>(bh * p.cap * p.keep) * elt;
        c.kbits = p.kbits + bh * p.cap * W;
        c.vbits = p.vbits + bh * p.cap * W;
        c.keep = p.keep;
        c.words = W;
        c.t0 = part * ct;
        c.t1 = min64(p.n, c.t0 + ct);
        fn(c);
      },
      parallel && nc > 1 && (p.n + nr) * G * D * BH >= (int64_t{1} << 14));
  for (int64_t ci = 0; ci < nc; ++ci) {
    if (bad[ci] >= 0) bad_bitmap(p, ci / per_head, bad[ci] / 2, static_cast<int>(bad[ci] % 2));
  }
  merge_chunks(pm.get(), pl.get(), pacc.get(), head_first, G, D, p.out, p.lse);
}

}  // namespace sf
