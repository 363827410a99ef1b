// Quest in one call: the driver (a task per (b, KV head): scores, threshold selection, attention),
// the threshold selection and the scalar reference built from the quest_select and decode_attention
// oracles. The vector kernels are the decode-attention ones (decode_attention_kernels.h, per ISA).
#include "quest_attention.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_checks.h"
#include "decode_attention.h"
#include "threadpool.h"

namespace sf {

namespace {

constexpr int64_t kScoreBlock = 64;  // scratch scores per query row of the chunk kernel (its 64-token block)

std::string str(int64_t v) { return std::to_string(v); }

int64_t page_count(const QuestAttnProblem& p) { return (p.n + p.page - 1) / p.page; }

void check(const QuestAttnProblem& p) {
  check_kv_cache("Quest attention", {p.B, p.Hq, p.Hkv, p.D, p.n, p.cap}, 1);
  if (p.page < 1) throw std::invalid_argument("Quest attention needs page >= 1 tokens per page; got page=" + str(p.page));
  const int64_t npages = page_count(p);
  if (p.pcap < npages) {
    throw std::invalid_argument("Quest attention needs the key bounds of every page: " + str(p.pcap) +
                                " allocated pages < ceil(n / page) = " + str(npages));
  }
  if (p.read < 1 || p.read > npages) {
    throw std::invalid_argument("Quest attention reads 1 <= read <= ceil(n / page) = " + str(npages) +
                                " pages per kv head; got read=" + str(p.read) +
                                " (a budget covering the context is dense: use decode_attention)");
  }
}

// pieces (read, 2): the chosen pages, then the newest page [full * page, n)
void page_pieces(const QuestAttnProblem& p, const int32_t* pick, int32_t* pieces) {
  const int64_t keep = p.read - 1, full = page_count(p) - 1;
  for (int64_t i = 0; i < keep; ++i) {
    pieces[2 * i] = static_cast<int32_t>(pick[i] * p.page);
    pieces[2 * i + 1] = static_cast<int32_t>(p.page);
  }
  pieces[2 * keep] = static_cast<int32_t>(full * p.page);
  pieces[2 * keep + 1] = static_cast<int32_t>(p.n - full * p.page);
}

DecodeAttnProblem attention_over(const QuestAttnProblem& p, const int32_t* spans) {
  DecodeAttnProblem d;
  d.q = p.q;
  d.k = p.k;
  d.v = p.v;
  d.vt = p.vt;
  d.B = p.B;
  d.Hq = p.Hq;
  d.Hkv = p.Hkv;
  d.D = p.D;
  d.cap = p.cap;
  d.n = p.n;
  d.spans = spans;
  d.S = p.read;
  d.scale = p.scale;
  d.out = p.out;
  d.lse = p.lse;
  return d;
}

}  // namespace

void select_top(const float* score, int64_t n, int64_t keep, float* tmp, int32_t* chosen) {
  if (keep <= 0) return;
  if (keep >= n) {
    for (int64_t i = 0; i < n; ++i) chosen[i] = static_cast<int32_t>(i);
    return;
  }
  const float inf = std::numeric_limits<float>::infinity();
  auto key = [inf](float s) { return s != s ? inf : s; };  // NaN ranks above every number
  for (int64_t i = 0; i < n; ++i) tmp[i] = key(score[i]);
  std::nth_element(tmp, tmp + keep - 1, tmp + n, std::greater<float>());
  const float thr = tmp[keep - 1];  // the keep-th highest; tmp[0, keep - 1) >= thr >= the rest
  int64_t ties = keep;              // pages equal to thr to take: keep minus those above it
  for (int64_t i = 0; i < keep; ++i) ties -= tmp[i] > thr;
  int64_t c = 0;
  for (int64_t i = 0; i < n && c < keep; ++i) {
    const float s = key(score[i]);
    if (s > thr) {
      chosen[c++] = static_cast<int32_t>(i);
    } else if (s == thr && ties > 0) {
      --ties;
      chosen[c++] = static_cast<int32_t>(i);
    }
  }
}

void quest_attention_ref(const QuestAttnProblem& p) {
  check(p);
  const int64_t BH = p.B * p.Hkv, keep = p.read - 1;
  std::vector<int32_t> pick(static_cast<size_t>(BH * keep) + 1), spans(static_cast<size_t>(BH * p.read * 2));
  QuestSelectProblem s;
  s.q = p.q;
  s.kmin = p.kmin;
  s.kmax = p.kmax;
  s.vt = p.bvt;
  s.B = p.B;
  s.Hq = p.Hq;
  s.Hkv = p.Hkv;
  s.D = p.D;
  s.pcap = p.pcap;
  s.pages = page_count(p) - 1;
  s.keep = keep;
  s.chosen = pick.data();
  quest_select_ref(s);
  for (int64_t bh = 0; bh < BH; ++bh) page_pieces(p, pick.data() + bh * keep, spans.data() + bh * p.read * 2);
  decode_attention_ref(attention_over(p, spans.data()));
  if (p.chosen) std::copy(pick.begin(), pick.begin() + BH * keep, p.chosen);
}

void quest_attention(const QuestAttnProblem& p, Isa isa, bool parallel) {
  check(p);
  const int64_t G = p.Hq / p.Hkv, D = p.D, BH = p.B * p.Hkv, keep = p.read - 1, full = page_count(p) - 1;
  const PageScoreFn score_fn = page_score_kernel(isa, p.bvt);
  const AttnChunkFn attn_fn = attn_chunk_kernel(isa, p.vt);
  const int nthreads = num_threads();
  // one task per (b, KV head) does everything, unless the pairs are too few to keep the threads busy:
  // then the tasks only select, and decode_attention splits the chosen tokens into chunks
  const bool fused = !parallel || BH >= nthreads;
  const size_t elt = p.vt == VT::f32 ? 4 : 2, belt = p.bvt == VT::f32 ? 4 : 2;
  // per worker: qpos, qneg (D), scores and their copy (full), scaled queries and accumulators (G x D),
  // m and l (G), block scores (G x 64); the picked pages (keep) and the pieces (read x 2)
  const int64_t fw = 2 * D + 2 * full + 2 * G * D + 2 * G + G * kScoreBlock, iw = keep + 2 * p.read;
  std::unique_ptr<float[]> fbuf(new float[static_cast<size_t>(nthreads * fw)]);
  std::unique_ptr<int32_t[]> ibuf(new int32_t[static_cast<size_t>(nthreads * iw)]);
  std::unique_ptr<int32_t[]> spans(fused ? nullptr : new int32_t[static_cast<size_t>(BH * p.read * 2)]);
  parallel_for(
      BH,
      [&](int64_t bh, int worker) {
        float* qpos = fbuf.get() + worker * fw;
        float* qneg = qpos + D;
        float* score = qneg + D;
        float* tmp = score + full;
        int32_t* pick = p.chosen ? p.chosen + bh * keep : ibuf.get() + worker * iw;
        int32_t* pieces = fused ? ibuf.get() + worker * iw + keep : spans.get() + bh * p.read * 2;
        for (int64_t d = 0; d < D; ++d) qpos[d] = qneg[d] = 0.f;
        const float* qh = p.q + bh * G * D;  // the group's query heads (b * Hq + kvh * G = bh * G)
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t d = 0; d < D; ++d) (qh[g * D + d] > 0.f ? qpos : qneg)[d] += qh[g * D + d];
        }
        const size_t boff = static_cast<size_t>(bh * p.pcap * D) * belt;
        score_fn(qpos, qneg, static_cast<const char*>(p.kmin) + boff, static_cast<const char*>(p.kmax) + boff, full, D,
                 score);
        select_top(score, full, keep, tmp, pick);
        page_pieces(p, pick, pieces);
        if (!fused) return;
        float* qs = tmp + full;  // (G, D)
        for (int64_t i = 0; i < G * D; ++i) qs[i] = qh[i] * p.scale;
        AttnChunk c;
        c.q = qs;
        c.k = static_cast<const char*>(p.k) + static_cast<size_t>(bh * p.cap * D) * elt;
        c.v = static_cast<const char*>(p.v) + static_cast<size_t>(bh * p.cap * D) * elt;
        c.G = G;
        c.D = D;
        c.pieces = pieces;
        c.np = p.read;
        c.acc = qs + G * D;
        c.m = c.acc + G * D;
        c.l = c.m + G;
        c.scratch = c.l + G;
        attn_fn(c);
        const std::vector<int64_t> one_chunk{0, 1};
        merge_chunks(c.m, c.l, c.acc, one_chunk, G, D, p.out + bh * G * D, p.lse ? p.lse + bh * G : nullptr);
      },
      parallel && BH > 1);
  if (!fused) decode_attention(attention_over(p, spans.get()), isa, 0, parallel);
}

}  // namespace sf
