"""Decode-attention speed per step at long context: sparseforge's native kernel vs torch SDPA, Quest
and StreamingLLM vs dense, with the KV-bytes bound (issue 16, section 3).

Llama-3.2-1B-shaped attention of one layer (32 query heads, 8 KV heads, head dim 64), batch 1, one
decode step over a PagedKVCache holding the context, float32 and bfloat16 KV. Timed per step with
the library's interleaved timer (:func:`sparseforge.measure.timing.time_interleaved`, as the advisor
times: a random order every round, so load on the machine hits every variant alike; medians; the
speedups are medians of per-round paired ratios). The torch SDPA variants are timed as a group of
their own before ours (torch's OpenMP worker spins on the other core for milliseconds after each
call and would take it from whichever variant came next), and dense vs SDPA is a ratio of medians:

* ``sdpa``: the fastest of torch SDPA with ``enable_gqa=True``, SDPA on the query heads packed per
  KV head (what transformers does for a single query token), and the packed form on one torch
  thread (torch's OpenMP barrier suffers most when other processes share the cores); bfloat16 KV
  runs SDPA in bfloat16;
* ``dense``: the native decode kernel over every token (float32 query, float32 accumulate); each
  of ours is timed on the thread pool and on the calling thread alone (``*_pool``, ``*_serial``)
  and the faster counts, as for SDPA (``dense_op``: the same through the torch custom op);
* ``quest``: Quest(budget = context / 16) in one native call (``sparseforge::quest_attention``: the
  page bounds from the per-page key min/max, the top pages and the attention over them, per KV head);
  ``quest_2call`` the same step as the policy's spans (native page selection, then Python builds the
  spans) plus the decode kernel; ``quest_kernel`` the decode kernel alone on precomputed spans;
* ``streaming``: StreamingLLM(4 sinks, 1020 window) spans plus the kernel (1024 tokens every step);
* ``mustafar``: Mustafar(70%, 256 recent): the compressed-KV kernel over the pruned tokens plus the
  dense kernel over the recent ones (compressed before timing);
* ``double_sparsity``: DoubleSparsity(16 label channels, budget = context / 16, 4-bit label cache):
  the native label scores and top-k over every cached token's labels, the chosen tokens' keys and
  values gathered contiguous, and the kernel over them (``DoubleSparsity.decode``) (the label channels are the first 16 of each head, a stand-in for calibrated ones: the
  speed does not depend on which).

Each row also gives every variant's **read fraction**: the bytes it reads per step over the dense
KV bytes (Double Sparsity: the chosen tokens' K and V plus C / 2 + 4 bytes of labels per cached token).

Prefill rows (``--prefill N ...``, default 16K and 32K): causal attention of an N-token prompt in
one layer, float32 queries, the KV in each dtype: torch SDPA (``is_causal=True``, ``enable_gqa``;
bfloat16 KV runs SDPA in bfloat16; ours in its bf16 compute path, the ``compute`` column:
``amx``, ``avx512_bf16`` or ``float32``, see :func:`sparseforge.ops.prefill_attention.bf16_compute_path`;
``SPARSEFORGE_BF16_PATH`` forces one) against our prefill kernel dense and with TriangleMix's
Triangle pattern (default 8 sinks, 512 window, 128 last queries: one of its deep layers), and
TriangleMix over a whole model (half of the layers dense at the best dense time). The full shape is
32 query / 8 KV heads; ``--quick`` times one GQA group (4 / 1 heads: the work per head is the same,
an eighth of it) and float32 only, so a quick run stays within minutes on a shared machine.

KV-bytes bound: bytes each variant must read (dense: K and V of every token; Quest: K and V of the
budget plus the page min/max, 2 bfloat16 vectors per 16 tokens; StreamingLLM: 1024 tokens; Mustafar: kept
values plus one 64-bit bitmap word per token and tensor, recent tokens dense; Double Sparsity: the
budget's K and V plus the 4-bit label cache) divided by the
machine's read bandwidth measured in the same run (``torch.sum`` over 512 MB, 2 threads, best of 5).

    python benchmarks/bench_kv_speed.py --quick            # 1K-32K decode + 16K/32K prefill (one GQA group)
    python benchmarks/bench_kv_speed.py --skip-decode --prefill 16384 32768   # prefill rows only, full shape
    python benchmarks/bench_kv_speed.py --contexts 65536   # one context, longer timing
    python benchmarks/bench_kv_speed.py --e2e 32768        # + whole-model decode steps at 32K

``--e2e N``: a randomly initialised Llama-3.2-1B-shaped model (16 layers, hidden 2048, MLP 8192,
vocabulary 128256, tied embeddings, bfloat16, ~2.5 GB) with ``attn_implementation="sparseforge"``
decodes single tokens over a PagedKVCache pre-filled with N random tokens per layer (no prefill);
Dense, Quest(N / 16) and StreamingLLM(4, 1020) take turns step by step (the cache is cropped back
after each step), tokens/s as medians; the bound is (weights + KV bytes read) / bandwidth.

Writes ``benchmarks/results/kv_speed.json`` (``--quick``: ``kv_speed.quick.json``) and prints the
table and PASS/FAIL lines for the issue's targets.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from sparseforge import kernels
from sparseforge.runtime.machine import machine_info
from sparseforge.attention import Dense, DoubleSparsity, Mustafar, PagedKVCache, Quest, StreamingLLM, enable
from sparseforge.attention.policies import dense_spans
from sparseforge.ops.decode_attention import decode_attention
from sparseforge.ops.dense_bf16 import dense_bf16_gemv
from sparseforge.ops.prefill_attention import attend_prefill, bf16_compute_path, dense_pattern
from sparseforge.attention import TriangleMix
from sparseforge.measure.timing import time_interleaved

HQ, HKV, D = 32, 8, 64
PAGE = 16
SINKS, WINDOW = 4, 1020
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DS_CHANNELS = 16  # Double Sparsity's label channels per head (the paper's r = 16 of 128; here of 64)


def last_level_cache_mb() -> int:
    """Size of this CPU's largest cache in MB (sysfs), 0 when unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 / 1024, "M": 1, "G": 1024}.get(text[-1:], 1 / (1 << 20))
        sizes.append(float(text.rstrip("KMG")) * scale)
    return int(max(sizes, default=0))


def read_bandwidth(mb: int = 0, reps: int = 5) -> float:
    """Best read bandwidth (GB/s) of ``torch.sum`` over ``mb`` MB of float32 (0: twice the last-level
    cache, at least 512 MB, so the figure is the memory's)."""
    mb = mb or max(512, 2 * last_level_cache_mb())
    x = torch.ones(mb * (1 << 20) // 4)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def kv_bytes(n: int, elt: int, budget: int | None = None, window: int | None = None,
             mustafar: Mustafar | None = None, label_channels: int | None = None) -> int:
    """Bytes one decode step reads from one layer's cache (see the module doc)."""
    row = HKV * D * elt  # one token of K (or V) over the KV heads
    if label_channels is not None:  # Double Sparsity: the chosen tokens plus the 4-bit labels of all
        labels = HKV * n * (-(-label_channels // 2) + 4)
        return 2 * min(n, budget) * row + labels
    if mustafar is not None:
        done = mustafar_done(n, mustafar)
        keep_k, keep_v = mustafar.keep(D)
        return HKV * done * ((keep_k + keep_v) * elt + 2 * 8 * ((D + 63) // 64)) + 2 * (n - done) * row
    if window is not None:
        return 2 * min(n, window) * row
    if budget is None or budget >= n:
        return 2 * n * row
    return 2 * budget * row + 2 * (-(-n // PAGE)) * HKV * D * 2  # selected K and V + per-page bfloat16 min and max


def mustafar_done(n: int, mustafar: Mustafar) -> int:
    """Tokens Mustafar holds compressed at context ``n`` (whole chunks older than the recent window)."""
    return max(0, (n - mustafar.recent) // Mustafar.CHUNK * Mustafar.CHUNK)


def mustafar_released_of_dense(n: int, dtype: torch.dtype, seed: int = 0) -> float:
    """KV bytes a one-layer cache holds with Mustafar(70%, 256 recent, ``release_dense=True``) at context
    ``n``, over the dense KV bytes (``PagedKVCache.kv_bytes`` after the prefill compressed and freed)."""
    g = torch.Generator().manual_seed(seed)
    config = SimpleNamespace(num_hidden_layers=1, _attn_implementation=enable())
    cache = PagedKVCache(config, policy=Mustafar(0.7, recent=256, release_dense=True), page_size=PAGE, max_cache_len=n)
    for t0 in range(0, n, 4096):
        kv = [torch.randn(1, HKV, min(4096, n - t0), D, generator=g).to(dtype) for _ in range(2)]
        cache.update(kv[0], kv[1], 0)
    layer = cache.layers[0]
    layer.policy.observe_prefill(layer, torch.randn(1, HQ, n, D, generator=g)[:, :, -1:], D ** -0.5)
    return cache.kv_bytes() / (2 * n * HKV * D * torch.tensor([], dtype=dtype).element_size())


def timed(fns: dict, seconds: float, max_rounds: int = 400, min_rounds: int = 5):
    """The library's interleaved timer (:func:`sparseforge.measure.timing.time_interleaved`, as the
    advisor times): random order per round, medians, per-round paired ratios."""
    return time_interleaved(fns, budget_s=seconds, min_rounds=min_rounds, max_rounds=max_rounds, warmup=1)


def fastest(ms: dict, names) -> str:
    """The name among ``names`` with the smallest median."""
    return min(names, key=lambda k: ms[k])


def kernel_call(q, k, v, n: int, scale: float, spans_fn, parallel: bool):
    """One decode step of ours: the policy's spans (``spans_fn()``), then the native kernel, on the
    thread pool (``parallel``) or on the calling thread alone."""
    view = (lambda t: t.view(torch.uint16).numpy()) if k.dtype == torch.bfloat16 else (lambda t: t.numpy())
    kn, vn, native = view(k), view(v), kernels.native()

    def call():
        out = torch.empty(q.shape)
        native.decode_attention(q.numpy(), kn, vn, spans_fn().numpy(), n, scale, out.numpy(), "", 0, parallel)
        return out
    return call


def quest_call(q, layer, n: int, read: int, scale: float, parallel: bool):
    """One Quest step in one native call (``sparseforge::quest_attention``), on the thread pool
    (``parallel``) or on the calling thread alone."""
    view = (lambda t: t.view(torch.uint16).numpy()) if layer.k_store.dtype == torch.bfloat16 else (lambda t: t.numpy())
    kn, vn, native = view(layer.k_store), view(layer.v_store), kernels.native()
    kmin, kmax = layer.kmin.view(torch.uint16).numpy(), layer.kmax.view(torch.uint16).numpy()

    def call():
        out = torch.empty(q.shape)
        native.quest_attention(q.numpy(), kn, vn, kmin, kmax, n, PAGE, read, scale, out.numpy(), "", parallel)
        return out
    return call


def one_thread(fn, threads: int):
    """fn run with torch on one thread (restored to ``threads`` after)."""
    def call():
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
    return call


def bench_context(n: int, dtype: torch.dtype, seconds: float, bandwidth: float, threads: int, layers: int = 16,
                  seed: int = 0) -> dict:
    """One decode step of one layer, the calls rotating over ``layers`` caches (as a model's layers do,
    so the KV read is not left in the last-level cache by the previous call)."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(num_layers=layers, page_size=PAGE, max_cache_len=n, policy=Dense())
    for i in range(layers):
        for t0 in range(0, n, 4096):  # (1, Hkv, T, D) chunks: no second full-size temporary
            t = min(4096, n - t0)
            kv = [torch.randn(1, HKV, t, D, generator=g).to(dtype) for _ in range(2)]
            cache.update(kv[0], kv[1], i)
    q = torch.randn(1, HQ, D, generator=g)  # (B, Hq, D)
    q4 = q.to(dtype).unsqueeze(2)  # (B, Hq, 1, D)
    qp = q4.view(1, HKV, HQ // HKV, D)  # query heads packed per KV head
    scale = D ** -0.5
    quest, stream = Quest(budget=n // 16, dense_layers=0), StreamingLLM(SINKS, WINDOW)
    mustafar = Mustafar(0.7, recent=256)
    ds = DoubleSparsity(channels=DS_CHANNELS, budget=n // 16,
                        labels=torch.arange(DS_CHANNELS).expand(1, HKV, DS_CHANNELS).contiguous())
    for layer in cache.layers:
        ds.spans(layer, q, 0)  # fills the 4-bit label cache of every layer (as the prefill's tokens arrive)
    all_spans = dense_spans(1, HKV, n)
    quest_spans = [quest.spans(layer, q, 0) for layer in cache.layers]
    for layer in cache.layers:
        mustafar.observe_prefill(layer, q, scale)  # compresses every whole chunk older than the recent window
    turn = itertools.cycle(range(layers))  # every call, whatever its variant, reads the next layer

    def rotating(make):
        per_layer = [make(i, layer) for i, layer in enumerate(cache.layers)]
        return lambda: per_layer[next(turn)]()

    def sdpa(query, one=False):
        def make(i, layer):
            fn = lambda: F.scaled_dot_product_attention(query, layer.k_store, layer.v_store,  # noqa: E731
                                                        enable_gqa=query.shape[1] == HQ)
            return one_thread(fn, threads) if one else fn
        return rotating(make)

    fns = {
        "sdpa_gqa": sdpa(q4),
        "sdpa_packed": sdpa(qp),
        "sdpa_packed_1thread": sdpa(qp, one=True),
        "dense_op": rotating(lambda i, layer: lambda: decode_attention(q, layer.k_store, layer.v_store, all_spans, n, scale)),
        "mustafar": rotating(lambda i, layer: lambda: mustafar.decode(layer, q, all_spans, scale)),
        "double_sparsity": rotating(lambda i, layer: lambda: ds.decode(layer, q, ds.spans(layer, q, 0), scale)),
    }
    for mode, parallel in (("pool", True), ("serial", False)):
        fns[f"quest_{mode}"] = rotating(lambda i, layer, parallel=parallel: quest_call(
            q, layer, n, quest.pages(PAGE), scale, parallel))
    variants = {
        "dense": lambda i, layer: all_spans,
        "quest_2call": lambda i, layer: quest.spans(layer, q, 0),
        "quest_kernel": lambda i, layer: quest_spans[i],
        "streaming": lambda i, layer: stream.spans(layer, q, 0),
    }
    for name, spans_of in variants.items():
        for mode, parallel in (("pool", True), ("serial", False)):
            fns[f"{name}_{mode}"] = rotating(
                lambda i, layer, spans_of=spans_of, parallel=parallel: kernel_call(
                    q, layer.k_store, layer.v_store, n, scale, lambda: spans_of(i, layer), parallel))
    # torch's SDPA in a group of its own: its OpenMP worker keeps spinning on the other core for
    # milliseconds after each call, and the variant timed next in a shared round lost that core
    # (quiet, float32 32K: Mustafar 4.3 ms alone, 8.3 ms right after SDPA; dense 7.5 -> 9.1 ms)
    sdpa_names = ("sdpa_gqa", "sdpa_packed", "sdpa_packed_1thread")
    meas_sdpa = timed({name: fns.pop(name) for name in sdpa_names}, seconds)
    meas = timed(fns, seconds)
    ms = {**meas_sdpa.ms(), **meas.ms()}
    best = {"sdpa": fastest(ms, sdpa_names)}
    best.update({name: fastest(ms, (f"{name}_pool", f"{name}_serial")) for name in (*variants, "quest")})
    best["mustafar"] = "mustafar"
    best["double_sparsity"] = "double_sparsity"
    for name, key in best.items():
        ms[name] = ms[key]
    elt = torch.tensor([], dtype=dtype).element_size()
    nbytes = {"dense": kv_bytes(n, elt), "quest": kv_bytes(n, elt, budget=n // 16),
              "streaming": kv_bytes(n, elt, window=SINKS + WINDOW), "mustafar": kv_bytes(n, elt, mustafar=mustafar),
              "double_sparsity": kv_bytes(n, elt, budget=n // 16, label_channels=DS_CHANNELS)}
    bound_ms = {name: b / bandwidth / 1e6 for name, b in nbytes.items()}
    if mustafar.decode(cache.layers[0], q, all_spans, scale) is None:
        ms["mustafar"] = ms["dense"]  # nothing old enough to compress: Mustafar attends densely
        best["mustafar"] = best["dense"]
    speedup = lambda slow, fast: meas.ratio(best[slow], best[fast])[0]  # noqa: E731  paired per-round ratio
    return {
        "context": n, "dtype": str(dtype).replace("torch.", ""), "layers": layers, "ms": ms, "bytes": nbytes,
        "bound_ms": bound_ms, "dense_vs_sdpa": ms["sdpa"] / ms["dense"],  # medians of the two groups
        "quest_vs_dense": speedup("dense", "quest"),
        "quest_2call_vs_dense": speedup("dense", "quest_2call"),
        "quest_bound_vs_dense": nbytes["dense"] / nbytes["quest"],
        "mustafar_vs_dense": speedup("dense", "mustafar"), "mustafar_bound_vs_dense": nbytes["dense"] / nbytes["mustafar"],
        # KV memory: the compressed format (kept values, bitmaps, the dense recent window) over the dense
        # cache, and what the cache holds (the dense copy of the compressed tokens is kept)
        "mustafar_kv_format_of_dense": nbytes["mustafar"] / nbytes["dense"],
        "mustafar_kv_held_of_dense": (nbytes["dense"] + nbytes["mustafar"] - 2 * (n - mustafar_done(n, mustafar)) * HKV * D * elt)
        / nbytes["dense"],
        "mustafar_kv_released_of_dense": mustafar_released_of_dense(n, dtype),  # release_dense=True, measured
        "ds_vs_dense": speedup("dense", "double_sparsity"), "ds_bound_vs_dense": nbytes["dense"] / nbytes["double_sparsity"],
        "read_fraction": {name: b / nbytes["dense"] for name, b in nbytes.items()},
        "dense_of_bound": bound_ms["dense"] / ms["dense"], "stable": meas.stable and meas_sdpa.stable,
        "rounds": meas.rounds, "sdpa_rounds": meas_sdpa.rounds,
    }


PREFILL_HEADS = {"full": (HQ, HKV), "quick": (HQ // HKV, 1)}  # query heads, KV heads (quick: one GQA group)


def bench_prefill(n: int, dtype: torch.dtype, seconds: float, threads: int, heads: tuple[int, int] = (HQ, HKV),
                  seed: int = 0) -> dict:
    """Causal attention of an ``n``-token prompt in one layer: torch SDPA (``is_causal``, GQA) against
    our prefill kernel dense and with TriangleMix's Triangle pattern (its deep layers, default
    settings); the ``model`` column is TriangleMix over a whole model, half of its layers dense."""
    hq, hkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, D, generator=g)  # (B, Hq, T, D) float32, as the attention hands it over
    k = torch.randn(1, hkv, n, D, generator=g).to(dtype)
    v = torch.randn(1, hkv, n, D, generator=g).to(dtype)
    qd = q.to(dtype)
    scale = D ** -0.5
    tri = TriangleMix()
    pattern = tri.pattern(n, triangle=True)
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(qd, k, v, is_causal=True, enable_gqa=hkv != hq),
        "dense": lambda: attend_prefill(q, k, v, n, scale, **dense_pattern(n)),
        "triangle": lambda: attend_prefill(q, k, v, n, scale, **pattern),
    }
    meas = timed(fns, seconds, max_rounds=50, min_rounds=3)
    ms = meas.ms()
    dense_vs_sdpa = meas.ratio("sdpa", "dense")[0]
    tri_vs_dense = meas.ratio("dense", "triangle")[0]
    tri_vs_sdpa = meas.ratio("sdpa", "triangle")[0]
    best_dense = min(ms["sdpa"], ms["dense"])
    compute = bf16_compute_path() if dtype == torch.bfloat16 else "scalar"
    return {
        "context": n, "dtype": str(dtype).replace("torch.", ""), "heads": [hq, hkv], "ms": ms,
        "compute": "float32" if compute == "scalar" else compute,
        "dense_vs_sdpa": dense_vs_sdpa, "triangle_vs_dense": tri_vs_dense, "triangle_vs_sdpa": tri_vs_sdpa,
        "model_vs_best_dense": 2 * best_dense / (best_dense + ms["triangle"]),
        "settings": {"sinks": tri.sinks, "window": tri.window, "last": tri.last}, "stable": meas.stable,
        "rounds": meas.rounds,
    }


def prefill_table(rows: list[dict]) -> str:
    out = ["| KV | compute | context | heads (q/kv) | SDPA ms | dense ms | dense vs SDPA | Triangle ms | Triangle vs dense | "
           "Triangle vs SDPA | TriangleMix model (half dense) vs best dense |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        out.append(f"| {r['dtype']} | {r.get('compute', 'float32')} | {r['context']} | {r['heads'][0]}/{r['heads'][1]} | {ms['sdpa']:.0f} | "
                   f"{ms['dense']:.0f} | {r['dense_vs_sdpa']:.2f}x | {ms['triangle']:.0f} | {r['triangle_vs_dense']:.2f}x | "
                   f"{r['triangle_vs_sdpa']:.2f}x | {r['model_vs_best_dense']:.2f}x |")
    return "\n".join(out)


def prefill_verdicts(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        tag = f"{r['dtype']} ({r.get('compute', 'float32')} compute) {r['context']}"
        lines.append(f"{'PASS' if r['dense_vs_sdpa'] >= 1.0 else 'FAIL'} dense prefill >= 1.0x SDPA at {tag}: "
                     f"{r['dense_vs_sdpa']:.2f}x")
        if r["context"] >= 16384:
            worst = min(r["triangle_vs_dense"], r["triangle_vs_sdpa"])
            lines.append(f"{'PASS' if worst >= 2.0 else 'FAIL'} TriangleMix (Triangle layer) >= 2x dense attention "
                         f"prefill at {tag}: {r['triangle_vs_dense']:.2f}x ours, {r['triangle_vs_sdpa']:.2f}x SDPA")
    return lines


E2E = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=HQ,
           num_key_value_heads=HKV, head_dim=D, vocab_size=128256, tie_word_embeddings=True,
           max_position_embeddings=131072)


class NativeGemvLinear(torch.nn.Module):
    """A bfloat16 ``nn.Linear`` whose one-token calls run sparseforge's native bf16 GEMV
    (:func:`sparseforge.ops.dense_bf16.dense_bf16_gemv`, as the native decode engine does; torch's
    bf16 ``F.linear`` streams the weight at about half the machine's bandwidth at batch 1); any
    other input goes to the layer."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):  # (..., in) -> (..., out)
        if x.dtype != torch.bfloat16 or x.numel() != x.shape[-1]:
            return self.linear(x)
        y = dense_bf16_gemv(x.reshape(1, -1).contiguous(), self.linear.weight, self.linear.bias)
        return y.view(*x.shape[:-1], -1)


def native_linears_(model: torch.nn.Module) -> list:
    """Wraps every bfloat16 ``nn.Linear`` of ``model`` in :class:`NativeGemvLinear` (in place);
    returns what :func:`restore_linears_` needs to undo it."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, NativeGemvLinear(child))
                swaps.append((parent, name, child))
    return swaps


def restore_linears_(swaps: list) -> None:
    for parent, name, child in swaps:
        setattr(parent, name, child)


def bench_e2e(context: int, steps: int, bandwidth: float, seed: int = 0, linears=("native", "torch"), **overrides) -> dict:
    """Whole-model decode steps over a pre-filled cache, Dense / Quest 1/16 / StreamingLLM / Mustafar in
    turn (:func:`sparseforge.attention.speed.decode_speed`), with the bytes bound; once per way of
    running the projections and the LM head (``linears``: ``"native"``, the native bf16 GEMV of
    :class:`NativeGemvLinear`; ``"torch"``, transformers' bf16 ``nn.Linear``). The first is the
    headline (``tokens_per_s``), each is in ``by_linear``."""
    import transformers

    from sparseforge.attention.speed import decode_speed

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**E2E, **overrides})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # weights created in bfloat16 (no float32 copy of 1.2B parameters)
    try:
        model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    policies = {"dense": Dense(), "quest": Quest(budget=context // 16), "streaming": StreamingLLM(SINKS, WINDOW),
                "mustafar": Mustafar(0.7, recent=256)}
    by_linear = {}
    for mode in linears:
        swaps = native_linears_(model) if mode == "native" else []
        try:
            by_linear[mode] = decode_speed(model, context, policies, steps=steps, seed=seed)
        finally:
            restore_linears_(swaps)
    speed = by_linear[linears[0]]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_layer = {"dense": kv_bytes(context, 2), "quest": kv_bytes(context, 2, budget=context // 16),
                "streaming": kv_bytes(context, 2, window=SINKS + WINDOW),
                "mustafar": kv_bytes(context, 2, mustafar=policies["mustafar"])}
    out = {"context": context, "steps": steps, "weights_bytes": weights, "tokens_per_s": {}, "bound_tokens_per_s": {},
           "read_fraction": {}, "linear": linears[0],
           "by_linear": {mode: {name: r["tokens_per_s"] for name, r in res.items()} for mode, res in by_linear.items()}}
    for name in policies:
        out["tokens_per_s"][name] = speed[name]["tokens_per_s"]
        out["read_fraction"][name] = speed[name]["read_fraction"]
        out["bound_tokens_per_s"][name] = bandwidth * 1e9 / (weights + config.num_hidden_layers * kv_layer[name])
    out["quest_vs_dense"] = out["tokens_per_s"]["quest"] / out["tokens_per_s"]["dense"]
    out["quest_vs_dense_bound"] = out["bound_tokens_per_s"]["quest"] / out["bound_tokens_per_s"]["dense"]
    return out


def e2e_table(e: dict) -> str:
    modes = list(e.get("by_linear") or {e.get("linear", "torch"): e["tokens_per_s"]})
    names = {"native": "tokens/s (native bf16 GEMV)", "torch": "tokens/s (torch F.linear)"}
    lines = [f"| whole model, {e['context']} tokens, bf16 | " + " | ".join(names[m] for m in modes) +
             " | bytes bound tokens/s | read fraction |", "|---|" + "---|" * (len(modes) + 2)]
    by = e.get("by_linear") or {modes[0]: e["tokens_per_s"]}
    for name in e["tokens_per_s"]:
        cells = " | ".join(f"{by[m][name]:.2f}" for m in modes)
        lines.append(f"| {name} | {cells} | {e['bound_tokens_per_s'][name]:.2f} | {e['read_fraction'][name]:.3f} |")
    ratios = " | ".join(f"{by[m]['quest'] / by[m]['dense']:.2f}x" for m in modes)
    lines.append(f"| Quest vs dense | {ratios} | {e['quest_vs_dense_bound']:.2f}x | |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    out = ["| KV | context | SDPA ms | dense ms | dense vs SDPA | dense % of bytes bound | Quest 1/16 ms (two calls; kernel) | "
           "Quest vs dense (bound) | StreamingLLM ms | Mustafar 70% ms | Mustafar vs dense (bound) | "
           "Double Sparsity 1/16 ms | DS vs dense (bound) | DS read fraction |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        out.append(
            f"| {r['dtype']} | {r['context']} | {ms['sdpa']:.2f} | {ms['dense']:.2f} | {r['dense_vs_sdpa']:.2f}x | "
            f"{100 * r['dense_of_bound']:.0f}% | {ms['quest']:.2f} ({ms['quest_2call']:.2f}; {ms['quest_kernel']:.2f}) | "
            f"{r['quest_vs_dense']:.2f}x ({r['quest_bound_vs_dense']:.1f}x) | {ms['streaming']:.2f} | "
            f"{ms['mustafar']:.2f} | {r['mustafar_vs_dense']:.2f}x ({r['mustafar_bound_vs_dense']:.1f}x) | "
            f"{ms['double_sparsity']:.2f} | {r['ds_vs_dense']:.2f}x ({r['ds_bound_vs_dense']:.1f}x) | "
            f"{r['read_fraction']['double_sparsity']:.3f} |"
        )
    return "\n".join(out)


def verdicts(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        tag = f"{r['dtype']} {r['context']}"
        lines.append(f"{'PASS' if r['dense_vs_sdpa'] >= 1.0 else 'FAIL'} dense >= 1.0x SDPA at {tag}: {r['dense_vs_sdpa']:.2f}x")
        if r["context"] >= 8192:
            ok = r["dense_of_bound"] >= 0.8
            lines.append(f"{'PASS' if ok else 'FAIL'} dense >= 80% of the KV-bytes bound at {tag}: {100 * r['dense_of_bound']:.0f}%")
        if r["context"] == 32768:
            ok = r["quest_vs_dense"] >= 6.0
            lines.append(f"{'PASS' if ok else 'FAIL'} Quest 1/16 >= 6x dense at {tag}: {r['quest_vs_dense']:.2f}x")
            ok = r["mustafar_vs_dense"] >= 1.8
            lines.append(f"{'PASS' if ok else 'FAIL'} Mustafar 70% >= 1.8x dense at {tag}: {r['mustafar_vs_dense']:.2f}x")
            ok = r["mustafar_kv_released_of_dense"] <= 0.5
            lines.append(f"{'PASS' if ok else 'FAIL'} Mustafar 70% KV memory <= 50% of dense at {tag}: "
                         f"{100 * r['mustafar_kv_released_of_dense']:.0f}% held with release_dense=True "
                         f"({100 * r['mustafar_kv_held_of_dense']:.0f}% with the dense copy kept)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="contexts 1K-32K, 0.3 s per variant")
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="tokens in the cache (default 1K 4K 16K 32K 64K; --quick: up to 32K)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per variant and cell")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--e2e", type=int, default=None, metavar="N", help="also time whole-model decode at N tokens")
    parser.add_argument("--e2e-steps", type=int, default=5)
    parser.add_argument("--bandwidth-mb", type=int, default=0,
                        help="buffer read to measure the bandwidth (default: 2x the last-level cache, >= 512)")
    parser.add_argument("--layers", type=int, default=16, help="caches the per-layer calls rotate over")
    parser.add_argument("--prefill", type=int, nargs="*", default=None, metavar="N",
                        help="prompt lengths of the prefill rows (default 16K 32K; give none to skip)")
    parser.add_argument("--prefill-heads", type=int, nargs=2, default=None, metavar=("HQ", "HKV"),
                        help="heads of the prefill rows (default 32 8; --quick: one GQA group, 4 1)")
    parser.add_argument("--prefill-dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help="KV dtypes of the prefill rows (default: --dtypes; --quick: float32)")
    parser.add_argument("--skip-decode", action="store_true", help="only the prefill rows")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.contexts is None:
        args.contexts = [1024, 4096, 16384, 32768] + ([] if args.quick else [65536])
    if args.quick:
        args.seconds = min(args.seconds, 0.3)
    if args.prefill is None:
        args.prefill = [16384, 32768]
    for n in args.contexts:
        if n < 256 or n % 256:
            parser.error(f"--contexts must be multiples of 256 (Quest's budget n/16 in whole pages), got {n}")
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    load_before = os.getloadavg()
    bandwidth = read_bandwidth(args.bandwidth_mb)
    rows = []
    for name in [] if args.skip_decode else args.dtypes:
        for n in args.contexts:
            rows.append(bench_context(n, DTYPES[name], args.seconds, bandwidth, args.threads, args.layers))
            print(f"  {name} {n}: dense {rows[-1]['ms']['dense']:.2f} ms, SDPA {rows[-1]['ms']['sdpa']:.2f} ms", flush=True)
    prefill_rows = []
    heads = tuple(args.prefill_heads) if args.prefill_heads else PREFILL_HEADS["quick" if args.quick else "full"]
    for name in args.prefill_dtypes or (["float32"] if args.quick else args.dtypes):
        for n in args.prefill:
            prefill_rows.append(bench_prefill(n, DTYPES[name], args.seconds, args.threads, heads))
            r = prefill_rows[-1]
            print(f"  prefill {name} {n}: SDPA {r['ms']['sdpa']:.0f} ms, dense {r['ms']['dense']:.0f} ms, "
                  f"Triangle {r['ms']['triangle']:.0f} ms", flush=True)
    machine = machine_info(args.threads)
    text = table(rows)
    context = (f"batch 1, {args.threads} threads, {machine['cpu']}, ISA {machine['isa']}, last-level cache "
               f"{last_level_cache_mb()} MB, read bandwidth {bandwidth:.1f} GB/s, load average {load_before[0]:.1f}")
    if rows:
        print(f"\n### decode attention per layer (Hq {HQ}, Hkv {HKV}, d {D}; {args.layers} layers in turn), {context}\n")
        print(text + "\n")
    ptext = prefill_table(prefill_rows)
    if prefill_rows:
        print(f"\n### prefill attention per layer (d {D}; TriangleMix {TriangleMix()}), {context}\n")
        print(ptext + "\n")
    lines = verdicts(rows) + prefill_verdicts(prefill_rows)
    e2e = None
    if args.e2e:
        e2e = bench_e2e(args.e2e, args.e2e_steps, bandwidth)
        print(e2e_table(e2e) + "\n")
        ok = e2e["quest_vs_dense"] >= 2.0
        lines.append(f"{'PASS' if ok else 'FAIL'} Quest >= 2x dense end to end at {args.e2e}: {e2e['quest_vs_dense']:.2f}x "
                     f"(bytes bound {e2e['quest_vs_dense_bound']:.2f}x)")
    print("\n".join(lines))
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / ("kv_speed.quick.json" if args.quick else "kv_speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**machine, "bandwidth_gbs": bandwidth, "last_level_cache_mb": last_level_cache_mb(), "layers": args.layers, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "shape": {"Hq": HQ, "Hkv": HKV, "D": D, "page": PAGE, "sinks": SINKS, "window": WINDOW},
            "seconds": args.seconds, "quick": args.quick,
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, "table": text, "prefill_rows": prefill_rows,
                               "prefill_table": ptext, "e2e": e2e, "verdicts": lines}, indent=1) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
