// nanobind binding of the decode- and prefill-attention kernels (csrc/decode_attention.h,
// csrc/prefill_attention.h) over raw buffers:
//   decode_attention(q, k, v, spans, n, scale, out, isa="", chunk=0, parallel=True, lse=None)
//   decode_attention_ref(q, k, v, spans, n, scale, out)          (the scalar oracle)
//   quest_select(q, kmin, kmax, pages, chosen, isa="", parallel=True), quest_select_ref(...)
//     kmin / kmax (B, Hkv, allocated pages, D) like k; chosen (B, Hkv, keep) int32, overwritten
//   quest_attention(q, k, v, kmin, kmax, n, page, read, scale, out, isa="", parallel=True, lse=None, chosen=None), _ref
//     one Quest step (csrc/quest_attention.h): kmin / kmax (B, Hkv, allocated pages, D) float32 or bfloat16,
//     read pages per KV head (the newest included); chosen None or int32 (B, Hkv, read - 1), overwritten
//   sparse_kv_attention(q, kvals, kbits, vvals, vbits, n, scale, out, lse, isa="", chunk=0, parallel=True,
//     k=None, v=None, recent_start=0, recent_end=0), _ref (no isa / chunk / parallel)
//     kvals / vvals (B, Hkv, cap, keep) like k; kbits / vbits (B, Hkv, cap, ceil(D / 64)) int64 words; k / v
//     (B, Hkv, cap, D) of kvals' dtype: their tokens [recent_start, recent_end) join the same softmax
//   prefill_attention(q, k, v, n, scale, sinks, window, last, horizon, out, isa="", parallel=True, bf16_path=""), _ref
//     q (B, Hq, Tq, D) float32, the last Tq of the n cached tokens; out (B, Tq, Hq, D) float32 (csrc/prefill_attention.h);
//     bfloat16 k / v run the bf16 compute path prefill_bf16_path(isa, bf16_path) names
//   prefill_bf16_path(isa="", bf16_path="") -> "scalar" (float32 compute), "avx512_bf16" or "amx": bf16_path,
//     else SPARSEFORGE_BF16_PATH, else (auto) amx where this machine has it and the ISA in force (isa,
//     else SPARSEFORGE_ISA) is avx512, scalar otherwise (avx512_bf16 only when named)
//   label_scores(q, codes, scales, n, scores, isa="", parallel=True), label_scores_ref(q, codes, scales, n, scores)
//   label_select(q, codes, scales, n, budget, scores, chosen, isa="", parallel=True)    (csrc/label_select.h)
//   label_select_ref(scores, budget, chosen): the reference selection over given scores (B, Hkv, n)
//     q (B, Hkv, C) float32, codes (B, Hkv, C, cap / 2) uint8, scales (B, Hkv, cap) float32,
//     scores (B, Hkv, n) float32 and chosen (B, Hkv, budget) int32 overwritten
//   gather_tokens(src, idx, dst, parallel=True): dst (B, Hkv, k, D) = rows idx (B, Hkv, k) int32 of src
//     (B, Hkv, cap, D), float32 or bfloat16 (raw uint16 bits), dst of src's dtype
// q (B, Hq, D) float32; k, v (B, Hkv, cap, D) float32, or bfloat16 as raw uint16 bits; spans
// (B, Hkv, S, 2) int32 [start, length); out (B, Hq, D) float32, overwritten; lse (B, Hq) float32 or
// None: the log of each softmax denominator (to merge attentions over disjoint token sets). All C-contiguous, CPU.
// Bad input raises ValueError (std::invalid_argument) naming the argument; an unknown or unsupported
// isa raises sparseforge.errors.ConfigError.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "binding.h"
#include "decode_attention.h"
#include "label_select.h"
#include "linear_bf16.h"
#include "prefill_attention.h"
#include "quest_attention.h"
#include "threadpool.h"

namespace sfb {

using namespace nb::literals;

namespace {

// The element type of a pair of cache tensors (k and v, or kmin and kmax): both float32 or both
// bfloat16 (raw uint16 bits), of one shape; ValueError naming them otherwise.
sf::VT pair_type(const In& a, const In& b, const std::string& names) {
  for (size_t d = 0; d < a.ndim(); ++d) {
    if (a.shape(d) != b.shape(d)) throw std::invalid_argument(names + " must have the same shape");
  }
  if (a.dtype() == nb::dtype<float>() && b.dtype() == nb::dtype<float>()) return sf::VT::f32;
  if (a.dtype() == nb::dtype<uint16_t>() && b.dtype() == nb::dtype<uint16_t>()) return sf::VT::bf16;
  throw std::invalid_argument(names + " must both be float32 or both bfloat16 (raw uint16 bits)");
}

// q, k, v, out and lse of a decode step checked and filled in (no spans)
sf::DecodeAttnProblem qkv_problem(const In& q, const In& k, const In& v, const Out& out, const nb::object& lse) {
  check_array(q, "q", 3);
  check_array(k, "k", 4);
  check_array(v, "v", 4);
  check_out(out, "out", 3);
  if (q.dtype() != nb::dtype<float>() || out.dtype() != nb::dtype<float>()) {
    throw std::invalid_argument("q and out must be float32");
  }
  sf::DecodeAttnProblem p;
  p.vt = pair_type(k, v, "k and v");
  p.B = dim(q, 0);
  p.Hq = dim(q, 1);
  p.D = dim(q, 2);
  p.Hkv = dim(k, 1);
  p.cap = dim(k, 2);
  if (dim(k, 0) != p.B || dim(k, 3) != p.D) throw std::invalid_argument("k must be (B, Hkv, cap, D) with q's B and D");
  if (static_cast<int64_t>(out.shape(0)) != p.B || static_cast<int64_t>(out.shape(1)) != p.Hq ||
      static_cast<int64_t>(out.shape(2)) != p.D) {
    throw std::invalid_argument("out must have q's shape");
  }
  p.q = static_cast<const float*>(q.data());
  p.k = k.data();
  p.v = v.data();
  p.out = static_cast<float*>(out.data());
  if (!lse.is_none()) {
    Out l = nb::cast<Out>(lse);
    check_out(l, "lse", 2);
    if (l.dtype() != nb::dtype<float>() || static_cast<int64_t>(l.shape(0)) != p.B ||
        static_cast<int64_t>(l.shape(1)) != p.Hq) {
      throw std::invalid_argument("lse must be float32 (B, Hq)");
    }
    p.lse = static_cast<float*>(l.data());
  }
  return p;
}

sf::DecodeAttnProblem problem(const In& q, const In& k, const In& v, const In& spans, int64_t n, double scale,
                              const Out& out, const nb::object& lse) {
  check_array(spans, "spans", 4);
  sf::DecodeAttnProblem p = qkv_problem(q, k, v, out, lse);
  if (spans.dtype() != nb::dtype<int32_t>()) throw std::invalid_argument("spans must be int32");
  p.S = dim(spans, 2);
  if (dim(spans, 0) != p.B || dim(spans, 1) != p.Hkv || dim(spans, 3) != 2) {
    throw std::invalid_argument("spans must be (B, Hkv, S, 2) with k's B and Hkv");
  }
  p.n = n;
  p.spans = static_cast<const int32_t*>(spans.data());
  p.scale = static_cast<float>(scale);
  return p;
}

sf::QuestSelectProblem select_problem(const In& q, const In& kmin, const In& kmax, int64_t pages, const Out& chosen) {
  check_array(q, "q", 3);
  check_array(kmin, "kmin", 4);
  check_array(kmax, "kmax", 4);
  check_out(chosen, "chosen", 3);
  if (q.dtype() != nb::dtype<float>()) throw std::invalid_argument("q must be float32");
  if (chosen.dtype() != nb::dtype<int32_t>()) throw std::invalid_argument("chosen must be int32");
  sf::QuestSelectProblem p;
  p.vt = pair_type(kmin, kmax, "kmin and kmax");
  p.B = dim(q, 0);
  p.Hq = dim(q, 1);
  p.D = dim(q, 2);
  p.Hkv = dim(kmin, 1);
  p.pcap = dim(kmin, 2);
  if (dim(kmin, 0) != p.B || dim(kmin, 3) != p.D) throw std::invalid_argument("kmin must be (B, Hkv, pages, D) with q's B and D");
  if (static_cast<int64_t>(chosen.shape(0)) != p.B || static_cast<int64_t>(chosen.shape(1)) != p.Hkv) {
    throw std::invalid_argument("chosen must be (B, Hkv, keep)");
  }
  p.keep = static_cast<int64_t>(chosen.shape(2));
  p.pages = pages;
  p.q = static_cast<const float*>(q.data());
  p.kmin = kmin.data();
  p.kmax = kmax.data();
  p.chosen = static_cast<int32_t*>(chosen.data());
  return p;
}

// q, k, v, out, lse checked as for decode_attention (spans: none), kmin / kmax as for quest_select
sf::QuestAttnProblem quest_problem(const In& q, const In& k, const In& v, const In& kmin, const In& kmax, int64_t n,
                                   int64_t page, int64_t read, double scale, const Out& out, const nb::object& lse,
                                   const nb::object& chosen) {
  check_array(kmin, "kmin", 4);
  check_array(kmax, "kmax", 4);
  const sf::DecodeAttnProblem d = qkv_problem(q, k, v, out, lse);
  sf::QuestAttnProblem p;
  p.q = d.q;
  p.k = d.k;
  p.v = d.v;
  p.vt = d.vt;
  p.B = d.B;
  p.Hq = d.Hq;
  p.Hkv = d.Hkv;
  p.D = d.D;
  p.cap = d.cap;
  p.out = d.out;
  p.lse = d.lse;
  p.bvt = pair_type(kmin, kmax, "kmin and kmax");
  if (dim(kmin, 0) != p.B || dim(kmin, 1) != p.Hkv || dim(kmin, 3) != p.D) {
    throw std::invalid_argument("kmin and kmax must be (B, Hkv, pages, D) with k's B, Hkv and D");
  }
  p.pcap = dim(kmin, 2);
  p.kmin = kmin.data();
  p.kmax = kmax.data();
  p.n = n;
  p.page = page;
  p.read = read;
  p.scale = static_cast<float>(scale);
  if (!chosen.is_none()) {
    Out c = nb::cast<Out>(chosen);
    check_out(c, "chosen", 3);
    if (c.dtype() != nb::dtype<int32_t>() || static_cast<int64_t>(c.shape(0)) != p.B ||
        static_cast<int64_t>(c.shape(1)) != p.Hkv || static_cast<int64_t>(c.shape(2)) != read - 1) {
      throw std::invalid_argument("chosen must be int32 (B, Hkv, read - 1)");
    }
    p.chosen = static_cast<int32_t*>(c.data());
  }
  return p;
}

sf::SparseKvProblem sparse_problem(const In& q, const In& kvals, const In& kbits, const In& vvals, const In& vbits,
                                   int64_t n, double scale, const Out& out, const Out& lse, const nb::object& k,
                                   const nb::object& v, int64_t recent_start, int64_t recent_end) {
  check_array(q, "q", 3);
  check_array(kvals, "kvals", 4);
  check_array(vvals, "vvals", 4);
  check_array(kbits, "kbits", 4);
  check_array(vbits, "vbits", 4);
  check_out(out, "out", 3);
  check_out(lse, "lse", 2);
  if (q.dtype() != nb::dtype<float>() || out.dtype() != nb::dtype<float>() || lse.dtype() != nb::dtype<float>()) {
    throw std::invalid_argument("q, out and lse must be float32");
  }
  sf::SparseKvProblem p;
  p.vt = pair_type(kvals, vvals, "kvals and vvals");
  for (const In* b : {&kbits, &vbits}) {
    if (b->dtype() != nb::dtype<int64_t>() && b->dtype() != nb::dtype<uint64_t>()) {
      throw std::invalid_argument("kbits and vbits must be 64-bit bitmap words (int64 or uint64)");
    }
  }
  p.B = dim(q, 0);
  p.Hq = dim(q, 1);
  p.D = dim(q, 2);
  p.Hkv = dim(kvals, 1);
  p.cap = dim(kvals, 2);
  p.keep = dim(kvals, 3);
  const int64_t W = (p.D + 63) / 64;
  for (const In* a : {&kvals, &vvals}) {
    if (dim(*a, 0) != p.B || dim(*a, 1) != p.Hkv || dim(*a, 2) != p.cap || dim(*a, 3) != p.keep) {
      throw std::invalid_argument("kvals and vvals must both be (B, Hkv, cap, keep) with q's B");
    }
  }
  for (const In* a : {&kbits, &vbits}) {
    if (dim(*a, 0) != p.B || dim(*a, 1) != p.Hkv || dim(*a, 2) != p.cap || dim(*a, 3) != W) {
      throw std::invalid_argument("kbits and vbits must be (B, Hkv, cap, ceil(D / 64)) like kvals");
    }
  }
  if (static_cast<int64_t>(out.shape(0)) != p.B || static_cast<int64_t>(out.shape(1)) != p.Hq ||
      static_cast<int64_t>(out.shape(2)) != p.D || static_cast<int64_t>(lse.shape(0)) != p.B ||
      static_cast<int64_t>(lse.shape(1)) != p.Hq) {
    throw std::invalid_argument("out must have q's shape and lse (B, Hq)");
  }
  p.q = static_cast<const float*>(q.data());
  p.kvals = kvals.data();
  p.vvals = vvals.data();
  p.kbits = static_cast<const uint64_t*>(kbits.data());
  p.vbits = static_cast<const uint64_t*>(vbits.data());
  p.n = n;
  p.scale = static_cast<float>(scale);
  p.out = static_cast<float*>(out.data());
  p.lse = static_cast<float*>(lse.data());
  if (k.is_none() != v.is_none()) throw std::invalid_argument("give both k and v (the dense tokens) or neither");
  if (!k.is_none()) {
    const In kd = nb::cast<In>(k), vd = nb::cast<In>(v);
    check_array(kd, "k", 4);
    check_array(vd, "v", 4);
    if (pair_type(kd, vd, "k and v") != p.vt) throw std::invalid_argument("k and v must have the dtype of kvals and vvals");
    if (dim(kd, 0) != p.B || dim(kd, 1) != p.Hkv || dim(kd, 3) != p.D || dim(vd, 2) != dim(kd, 2)) {
      throw std::invalid_argument("k and v must both be (B, Hkv, cap, D) with q's B and D and kvals' Hkv");
    }
    p.k = kd.data();
    p.v = vd.data();
    p.kcap = dim(kd, 2);
    p.r0 = recent_start;
    p.r1 = recent_end;
  }
  return p;
}

sf::PrefillAttnProblem prefill_problem(const In& q, const In& k, const In& v, int64_t n, double scale, int64_t sinks,
                                       int64_t window, int64_t last, int64_t horizon, const Out& out) {
  check_array(q, "q", 4);
  check_array(k, "k", 4);
  check_array(v, "v", 4);
  check_out(out, "out", 4);
  if (q.dtype() != nb::dtype<float>() || out.dtype() != nb::dtype<float>()) {
    throw std::invalid_argument("q and out must be float32");
  }
  sf::PrefillAttnProblem p;
  p.vt = pair_type(k, v, "k and v");
  p.B = dim(q, 0);
  p.Hq = dim(q, 1);
  p.Tq = dim(q, 2);
  p.D = dim(q, 3);
  p.Hkv = dim(k, 1);
  p.cap = dim(k, 2);
  if (dim(k, 0) != p.B || dim(k, 3) != p.D) throw std::invalid_argument("k must be (B, Hkv, cap, D) with q's B and D");
  if (static_cast<int64_t>(out.shape(0)) != p.B || static_cast<int64_t>(out.shape(1)) != p.Tq ||
      static_cast<int64_t>(out.shape(2)) != p.Hq || static_cast<int64_t>(out.shape(3)) != p.D) {
    throw std::invalid_argument("out must be (B, Tq, Hq, D) for q (B, Hq, Tq, D)");
  }
  p.q = static_cast<const float*>(q.data());
  p.k = k.data();
  p.v = v.data();
  p.n = n;
  p.sinks = sinks;
  p.window = window;
  p.last = last;
  p.horizon = horizon;
  p.scale = static_cast<float>(scale);
  p.out = static_cast<float*>(out.data());
  return p;
}

// auto: amx where the CPU has it and the ISA in force is avx512, else float32 compute (the
// vdpbf16ps tile measured ~10% slower than the float32 kernel on a Sapphire Rapids host: one
// vdpbf16ps per cycle against two FMAs, plus the packing); a named path is taken as named
sf::LabelProblem label_problem(const In& q, const In& codes, const In& scales, int64_t n, const Out& scores) {
  check_array(q, "q", 3);
  check_array(codes, "codes", 4);
  check_array(scales, "scales", 3);
  check_out(scores, "scores", 3);
  if (q.dtype() != nb::dtype<float>() || scales.dtype() != nb::dtype<float>() || scores.dtype() != nb::dtype<float>()) {
    throw std::invalid_argument("q, scales and scores must be float32");
  }
  if (codes.dtype() != nb::dtype<uint8_t>()) throw std::invalid_argument("codes must be uint8");
  sf::LabelProblem p;
  p.B = dim(q, 0);
  p.Hkv = dim(q, 1);
  p.C = dim(q, 2);
  p.cap = dim(scales, 2);
  p.n = n;
  if (dim(codes, 0) != p.B || dim(codes, 1) != p.Hkv || dim(codes, 2) != p.C || dim(codes, 3) * 2 != p.cap) {
    throw std::invalid_argument("codes must be (B, Hkv, C, cap / 2) for q (B, Hkv, C) and scales (B, Hkv, cap)");
  }
  if (dim(scales, 0) != p.B || dim(scales, 1) != p.Hkv) throw std::invalid_argument("scales must be (B, Hkv, cap) with q's B and Hkv");
  if (static_cast<int64_t>(scores.shape(0)) != p.B || static_cast<int64_t>(scores.shape(1)) != p.Hkv ||
      static_cast<int64_t>(scores.shape(2)) != n) {
    throw std::invalid_argument("scores must be (B, Hkv, n)");
  }
  p.q = static_cast<const float*>(q.data());
  p.codes = static_cast<const uint8_t*>(codes.data());
  p.scales = static_cast<const float*>(scales.data());
  p.scores = static_cast<float*>(scores.data());
  return p;
}

sf::Bf16Path prefill_path(const std::string& requested, sf::Isa isa) {
  const char* env = std::getenv("SPARSEFORGE_BF16_PATH");
  const std::string want = requested.empty() ? (env ? env : "") : requested;
  if (!want.empty() && want != "auto") return resolve_bf16(requested);
  resolve_bf16(requested);  // a bad SPARSEFORGE_ISA or path setting still raises
  return isa == sf::Isa::avx512 && sf::bf16_path_supported(sf::Bf16Path::amx) ? sf::Bf16Path::amx : sf::Bf16Path::scalar;
}

}  // namespace

void register_attention(nb::module_& mod) {
  mod.def(
      "decode_attention",
      [](const In& q, const In& k, const In& v, const In& spans, int64_t n, double scale, const Out& out,
         const std::string& isa, int64_t chunk, bool parallel, const nb::object& lse) {
        const sf::DecodeAttnProblem p = problem(q, k, v, spans, n, scale, out, lse);
        const sf::Isa i = resolve(isa);
        sf::num_threads();
        nb::gil_scoped_release rel;
        sf::decode_attention(p, i, chunk, parallel);
      },
      "q"_a, "k"_a, "v"_a, "spans"_a, "n"_a, "scale"_a, "out"_a, "isa"_a = "", "chunk"_a = 0, "parallel"_a = true,
      "lse"_a.none() = nb::none(),
      "Decode attention over the selected token spans of a KV cache (csrc/decode_attention.h).");
  mod.def(
      "decode_attention_ref",
      [](const In& q, const In& k, const In& v, const In& spans, int64_t n, double scale, const Out& out,
         const nb::object& lse) {
        const sf::DecodeAttnProblem p = problem(q, k, v, spans, n, scale, out, lse);
        nb::gil_scoped_release rel;
        sf::decode_attention_ref(p);
      },
      "q"_a, "k"_a, "v"_a, "spans"_a, "n"_a, "scale"_a, "out"_a, "lse"_a.none() = nb::none(),
      "Scalar reference of decode_attention (the oracle).");
  mod.def(
      "sparse_kv_attention",
      [](const In& q, const In& kvals, const In& kbits, const In& vvals, const In& vbits, int64_t n, double scale,
         const Out& out, const Out& lse, const std::string& isa, int64_t chunk, bool parallel, const nb::object& k,
         const nb::object& v, int64_t recent_start, int64_t recent_end) {
        const sf::SparseKvProblem p =
            sparse_problem(q, kvals, kbits, vvals, vbits, n, scale, out, lse, k, v, recent_start, recent_end);
        const sf::Isa i = resolve(isa);
        sf::num_threads();
        nb::gil_scoped_release rel;
        sf::sparse_kv_attention(p, i, chunk, parallel);
      },
      "q"_a, "kvals"_a, "kbits"_a, "vvals"_a, "vbits"_a, "n"_a, "scale"_a, "out"_a, "lse"_a, "isa"_a = "", "chunk"_a = 0,
      "parallel"_a = true, "k"_a.none() = nb::none(), "v"_a.none() = nb::none(), "recent_start"_a = 0, "recent_end"_a = 0,
      "Decode attention over per-token pruned, compressed K/V (csrc/decode_attention.h).");
  mod.def(
      "sparse_kv_attention_ref",
      [](const In& q, const In& kvals, const In& kbits, const In& vvals, const In& vbits, int64_t n, double scale,
         const Out& out, const Out& lse, const nb::object& k, const nb::object& v, int64_t recent_start,
         int64_t recent_end) {
        const sf::SparseKvProblem p =
            sparse_problem(q, kvals, kbits, vvals, vbits, n, scale, out, lse, k, v, recent_start, recent_end);
        nb::gil_scoped_release rel;
        sf::sparse_kv_attention_ref(p);
      },
      "q"_a, "kvals"_a, "kbits"_a, "vvals"_a, "vbits"_a, "n"_a, "scale"_a, "out"_a, "lse"_a, "k"_a.none() = nb::none(),
      "v"_a.none() = nb::none(), "recent_start"_a = 0, "recent_end"_a = 0,
      "Scalar reference of sparse_kv_attention (the oracle).");
  mod.def(
      "quest_attention",
      [](const In& q, const In& k, const In& v, const In& kmin, const In& kmax, int64_t n, int64_t page, int64_t read,
         double scale, const Out& out, const std::string& isa, bool parallel, const nb::object& lse,
         const nb::object& chosen) {
        const sf::QuestAttnProblem p = quest_problem(q, k, v, kmin, kmax, n, page, read, scale, out, lse, chosen);
        const sf::Isa i = resolve(isa);
        sf::num_threads();
        nb::gil_scoped_release rel;
        sf::quest_attention(p, i, parallel);
      },
      "q"_a, "k"_a, "v"_a, "kmin"_a, "kmax"_a, "n"_a, "page"_a, "read"_a, "scale"_a, "out"_a, "isa"_a = "",
      "parallel"_a = true, "lse"_a.none() = nb::none(), "chosen"_a.none() = nb::none(),
      "One Quest decode step: page scores, top-k pages and the attention over them (csrc/quest_attention.h).");
  mod.def(
      "quest_attention_ref",
      [](const In& q, const In& k, const In& v, const In& kmin, const In& kmax, int64_t n, int64_t page, int64_t read,
         double scale, const Out& out, const nb::object& lse, const nb::object& chosen) {
        const sf::QuestAttnProblem p = quest_problem(q, k, v, kmin, kmax, n, page, read, scale, out, lse, chosen);
        nb::gil_scoped_release rel;
        sf::quest_attention_ref(p);
      },
      "q"_a, "k"_a, "v"_a, "kmin"_a, "kmax"_a, "n"_a, "page"_a, "read"_a, "scale"_a, "out"_a,
      "lse"_a.none() = nb::none(), "chosen"_a.none() = nb::none(), "Scalar reference of quest_attention (the oracle).");
  mod.def(
      "quest_select",
      [](const In& q, const In& kmin, const In& kmax, int64_t pages, const Out& chosen, const std::string& isa,
         bool parallel) {
        const sf::QuestSelectProblem p = select_problem(q, kmin, kmax, pages, chosen);
        const sf::Isa i = resolve(isa);
        sf::num_threads();
        nb::gil_scoped_release rel;
        sf::quest_select(p, i, parallel);
      },
      "q"_a, "kmin"_a, "kmax"_a, "pages"_a, "chosen"_a, "isa"_a = "", "parallel"_a = true,
      "Quest page selection per KV head (csrc/decode_attention.h): chosen (B, Hkv, keep) ascending.");
  mod.def(
      "quest_select_ref",
      [](const In& q, const In& kmin, const In& kmax, int64_t pages, const Out& chosen) {
        const sf::QuestSelectProblem p = select_problem(q, kmin, kmax, pages, chosen);
        nb::gil_scoped_release rel;
        sf::quest_select_ref(p);
      },
      "q"_a, "kmin"_a, "kmax"_a, "pages"_a, "chosen"_a, "Scalar reference of quest_select (the oracle).");
  mod.def(
      "prefill_attention",
      [](const In& q, const In& k, const In& v, int64_t n, double scale, int64_t sinks, int64_t window, int64_t last,
         int64_t horizon, const Out& out, const std::string& isa, bool parallel, const std::string& bf16_path) {
        const sf::PrefillAttnProblem p = prefill_problem(q, k, v, n, scale, sinks, window, last, horizon, out);
        const sf::Isa i = resolve(isa);
        const sf::Bf16Path path = p.vt == sf::VT::bf16 ? prefill_path(bf16_path, i) : sf::Bf16Path::scalar;
        sf::num_threads();
        nb::gil_scoped_release rel;
        sf::prefill_attention(p, i, path, parallel);
      },
      "q"_a, "k"_a, "v"_a, "n"_a, "scale"_a, "sinks"_a, "window"_a, "last"_a, "horizon"_a, "out"_a, "isa"_a = "",
      "parallel"_a = true, "bf16_path"_a = "", "Block-sparse causal prefill attention (csrc/prefill_attention.h).");
  mod.def(
      "label_scores",
      [](const In& q, const In& codes, const In& scales, int64_t n, const Out& scores, const std::string& isa,
         bool parallel) {
        const sf::LabelProblem p = label_problem(q, codes, scales, n, scores);
        const sf::Isa i = resolve(isa);
        sf::num_threads();
        nb::gil_scoped_release rel;
        sf::label_scores(p, i, parallel);
      },
      "q"_a, "codes"_a, "scales"_a, "n"_a, "scores"_a, "isa"_a = "", "parallel"_a = true,
      "Double Sparsity label scores over a 4-bit label cache (csrc/label_select.h).");
  mod.def(
      "label_scores_ref",
      [](const In& q, const In& codes, const In& scales, int64_t n, const Out& scores) {
        const sf::LabelProblem p = label_problem(q, codes, scales, n, scores);
        nb::gil_scoped_release rel;
        sf::label_scores_ref(p);
      },
      "q"_a, "codes"_a, "scales"_a, "n"_a, "scores"_a, "Scalar reference of label_scores (the oracle).");
  mod.def(
      "label_select",
      [](const In& q, const In& codes, const In& scales, int64_t n, int64_t budget, const Out& scores, const Out& chosen,
         const std::string& isa, bool parallel) {
        const sf::LabelProblem p = label_problem(q, codes, scales, n, scores);
        check_out(chosen, "chosen", 3);
        if (chosen.dtype() != nb::dtype<int32_t>() || static_cast<int64_t>(chosen.shape(0)) != p.B ||
            static_cast<int64_t>(chosen.shape(1)) != p.Hkv || static_cast<int64_t>(chosen.shape(2)) != budget) {
          throw std::invalid_argument("chosen must be int32 (B, Hkv, budget)");
        }
        const sf::Isa i = resolve(isa);
        sf::num_threads();
        nb::gil_scoped_release rel;
        sf::label_select(p, budget, static_cast<int32_t*>(chosen.data()), i, parallel);
      },
      "q"_a, "codes"_a, "scales"_a, "n"_a, "budget"_a, "scores"_a, "chosen"_a, "isa"_a = "", "parallel"_a = true,
      "Label scores, then the budget highest-scoring tokens per (b, KV head), ascending (csrc/label_select.h).");
  mod.def(
      "label_select_ref",
      [](const In& scores, int64_t budget, const Out& chosen) {
        check_array(scores, "scores", 3);
        check_out(chosen, "chosen", 3);
        if (scores.dtype() != nb::dtype<float>()) throw std::invalid_argument("scores must be float32");
        if (chosen.dtype() != nb::dtype<int32_t>() || chosen.shape(0) != scores.shape(0) ||
            chosen.shape(1) != scores.shape(1) || static_cast<int64_t>(chosen.shape(2)) != budget) {
          throw std::invalid_argument("chosen must be int32 (B, Hkv, budget)");
        }
        const int64_t rows = static_cast<int64_t>(scores.shape(0) * scores.shape(1));
        const int64_t n = static_cast<int64_t>(scores.shape(2));
        nb::gil_scoped_release rel;
        sf::label_select_ref(static_cast<const float*>(scores.data()), rows, n, budget,
                             static_cast<int32_t*>(chosen.data()));
      },
      "scores"_a, "budget"_a, "chosen"_a, "Reference selection over given scores: stable sort by rank key (the oracle).");
  mod.def(
      "gather_tokens",
      [](const In& src, const In& idx, const Out& dst, bool parallel) {
        check_array(src, "src", 4);
        check_array(idx, "idx", 3);
        check_out(dst, "dst", 4);
        const bool f32 = src.dtype() == nb::dtype<float>(), u16 = src.dtype() == nb::dtype<uint16_t>();
        if (!f32 && !u16) throw std::invalid_argument("src must be float32 or bfloat16 (raw uint16 bits)");
        if (dst.dtype() != src.dtype()) throw std::invalid_argument("dst must have src's dtype");
        if (idx.dtype() != nb::dtype<int32_t>()) throw std::invalid_argument("idx must be int32");
        const int64_t B = dim(src, 0), H = dim(src, 1), cap = dim(src, 2), D = dim(src, 3), k = dim(idx, 2);
        if (dim(idx, 0) != B || dim(idx, 1) != H) throw std::invalid_argument("idx must be (B, Hkv, k) with src's B and Hkv");
        if (static_cast<int64_t>(dst.shape(0)) != B || static_cast<int64_t>(dst.shape(1)) != H ||
            static_cast<int64_t>(dst.shape(2)) != k || static_cast<int64_t>(dst.shape(3)) != D) {
          throw std::invalid_argument("dst must be (B, Hkv, k, D)");
        }
        sf::num_threads();
        nb::gil_scoped_release rel;
        sf::gather_tokens(src.data(), f32 ? 4 : 2, B, H, cap, D, static_cast<const int32_t*>(idx.data()), k, dst.data(),
                          parallel);
      },
      "src"_a, "idx"_a, "dst"_a, "parallel"_a = true, "Rows of chosen tokens made contiguous (csrc/label_select.h).");
  mod.def(
      "prefill_bf16_path",
      [](const std::string& isa, const std::string& bf16_path) {
        return std::string(sf::bf16_path_name(prefill_path(bf16_path, resolve(isa))));
      },
      "isa"_a = "", "bf16_path"_a = "", "The compute path prefill_attention would take now for bfloat16 k / v.");
  mod.def(
      "prefill_attention_ref",
      [](const In& q, const In& k, const In& v, int64_t n, double scale, int64_t sinks, int64_t window, int64_t last,
         int64_t horizon, const Out& out) {
        const sf::PrefillAttnProblem p = prefill_problem(q, k, v, n, scale, sinks, window, last, horizon, out);
        nb::gil_scoped_release rel;
        sf::prefill_attention_ref(p);
      },
      "q"_a, "k"_a, "v"_a, "n"_a, "scale"_a, "sinks"_a, "window"_a, "last"_a, "horizon"_a, "out"_a,
      "Scalar reference of prefill_attention (the oracle).");
}

}  // namespace sfb
