"""Decode speed of transformers' ``generate`` against sparseforge's lean path and native engine, batch 1, same run.

Two random-weight Llamas (no download):

* **tiny** (hidden 256, 16 layers, FFN 704, 4 heads, vocab 1024; 51 MB of fp32 weights): the cost
  per token outside the weights. ``overhead ms`` = ms/token minus the time torch's dense GEMV
  (measured in the same run) takes to stream the weight bytes one token reads; ``beyond linears
  ms`` = ms/token minus ``linears ms``, the same-run median time of calling the model's own linear
  layers once each (the matmuls alone, with the caches as warm as the model's size allows);
* **llama** (issue 13's shape: hidden 2048, 16 layers, FFN 5632, 32 heads / 4 KV heads, vocab 4096):
  dense fp32, and magnitude-pruned 2:4 and 75% compressed with ``compress_(format="rule")``.

Each model variant is decoded by transformers' ``generate`` (``generate``), by
:func:`sparseforge.generation.lean_generate` eagerly (``lean``: fused q/k/v and gate/up), by the
native decode engine (:func:`sparseforge.generation.loop.native_generate`: ``engine`` with the native
decode-attention kernel, ``engine+sdpa`` with torch's SDPA) and, with ``--compile``, by the lean
path's compiled decode step (``lean+compile``; the first call's compile seconds are reported). Paths alternate round by round on copies of the model (medians of ``--rounds``) where the
copies fit in ``--copy-limit-mb``; a larger model runs the paths one after the other on one model
(the plain path first, then fused for the lean paths: ``interleaved: false``). Every path's greedy tokens are
compared with ``generate``'s. Decode ms/token comes from the arrival times of the tokens
(:func:`sparseforge.generation.timing_streamer`), prefill excluded. The table gives tokens/s,
ms/token, weight bytes read per token, the achieved GB/s and, in the header, torch's dense fp32 GEMV
rate measured in the same run. Sparse variants run inside ``kernels.sparse_threads`` (torch on one
thread, the kernels on ``--threads``). Variants are built one at a time (one model in memory).

    python benchmarks/bench_generate.py --quick            # small shapes, a few tokens (smoke, ~1 min)
    python benchmarks/bench_generate.py --compile          # full; writes results/generate.json
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_llamacpp import torch_gemv_gbps, weight_bytes_per_token  # noqa: E402
from bench_host import host_info, host_line  # noqa: E402
from bench_output import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("generate", "lean", "engine", "engine+sdpa", "lean+compile")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few tokens (smoke run)")
    p.add_argument("--models", nargs="+", default=["tiny", "llama"], choices=["tiny", "llama"])
    p.add_argument("--variants", nargs="+", default=["dense", "2:4", "0.75"], help="llama variants: dense, N:M, sparsity")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="generated tokens per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also measure the compiled decode step (slow to compile)")
    p.add_argument("--copy-limit-mb", type=int, default=1500,
                   help="paths alternate round by round on copies of the model when all copies fit in this many MB; "
                        "otherwise they run one after the other on one model (reported as interleaved: false)")
    p.add_argument("--gemv-mbytes", type=int, default=512, help="size of the GEMV bandwidth probe")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.shapes = {"tiny": dict(hidden=256, layers=16, ffn=704, heads=4, kv_heads=4, vocab=1024),
                   "llama": dict(hidden=2048, layers=16, ffn=5632, heads=32, kv_heads=4, vocab=4096)}
    if args.quick:
        args.shapes = {"tiny": dict(hidden=128, layers=4, ffn=256, heads=2, kv_heads=2, vocab=512),
                       "llama": dict(hidden=256, layers=2, ffn=704, heads=4, kv_heads=2, vocab=1024)}
        args.prompt, args.new, args.rounds, args.gemv_mbytes = 8, 8, 1, 64
    if args.new < 2:
        p.error("--new must be >= 2 (decode time is measured between the first and the last new token)")
    if args.out is None:
        args.out = RESULTS / ("generate.quick.json" if args.quick else "generate.json")
    return args


def build(shape: dict, variant: str, max_positions: int):
    """A random Llama of ``shape`` (seed 0), magnitude-pruned to ``variant`` and compressed unless dense."""
    import transformers as t

    import sparseforge as sf
    from sparseforge.runtime.compress import compress_

    torch.manual_seed(0)
    cfg = t.LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                        max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = t.LlamaForCausalLM(cfg).float().eval()
    if variant == "dense":
        return model, "dense fp32"
    kw = dict(pattern=variant) if ":" in variant else dict(pattern="unstructured", sparsity=float(variant))
    sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", **kw), progress=False)
    report = compress_(model, format="rule")
    label = variant if ":" in variant else f"{float(variant):.0%}"
    return model, f"{label} ({','.join(sorted({c.format for c in report.converted}))})"


def decode_once(model, ids: torch.Tensor, new: int, path: str, threads: int, sparse: bool, lean_configs: dict) -> dict:
    """One greedy generation of exactly ``new`` tokens; decode ms/token from the token arrival times."""
    from sparseforge import kernels
    from sparseforge.generation import lean_generate, timing_streamer
    from sparseforge.generation.loop import native_generate

    clock = timing_streamer()
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=0, streamer=clock)
    with (kernels.sparse_threads(threads) if sparse else nullcontext()), torch.inference_mode():
        start = time.perf_counter()
        if path == "generate":
            out = model.generate(ids, **kw)
        elif path.startswith("engine"):
            attention = "sdpa" if path == "engine+sdpa" else "native"
            out = native_generate(model, ids, max_new_tokens=new, min_new_tokens=new, streamer=clock, attention=attention)
        else:
            out = lean_generate(model, ids, lean_configs[path], **kw)
        end = time.perf_counter()
    t = clock.arrivals
    return {"ms_per_token": 1e3 * (t[-1] - t[0]) / (len(t) - 1), "prefill_s": t[0] - start, "total_s": end - start,
            "tokens": out[0, ids.shape[1]:].tolist()}


def linears_ms(model, threads: int, sparse: bool, reps: int = 20) -> float:
    """Median ms of one batch-1 call of every linear layer of ``model`` in turn (inputs prepared before timing):
    the matmul time of a token without anything else, measured on the model's own layers in the same run."""
    from sparseforge import kernels
    from sparseforge.nn.sparse_linear import SparseLinear

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, SparseLinear))]
    inputs = [torch.randn(1, m.in_features, dtype=torch.float32 if isinstance(m, SparseLinear) else m.weight.dtype)
              for m in layers]
    times = []
    with (kernels.sparse_threads(threads) if sparse else nullcontext()), torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            for m, x in zip(layers, inputs):
                m(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure_variant(model, label: str, model_name: str, args, gemv: float) -> list[dict]:
    import copy

    from sparseforge.generation import LeanConfig
    from sparseforge.nn.sparse_linear import SparseLinear

    sparse = any(isinstance(m, SparseLinear) for m in model.modules())
    bytes_per_token = weight_bytes_per_token(model)
    lean_configs = {"lean": LeanConfig(), "lean+compile": LeanConfig(compile=True)}
    paths = [p for p in PATHS if p != "lean+compile" or args.compile]
    ids = torch.randint(1, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    first_call_s = {}
    interleaved = bytes_per_token * len(paths) <= args.copy_limit_mb * 1e6
    matmul_ms = linears_ms(model, args.threads, sparse)  # before any path fuses the model's projections
    if interleaved:  # one copy per path, paths alternating round by round
        models = {p: model if p == "generate" else copy.deepcopy(model) for p in paths}
        for path in paths:  # warm-up; for lean+compile this call compiles
            t0 = time.perf_counter()
            decode_once(models[path], ids, 2, path, args.threads, sparse, lean_configs)
            first_call_s[path] = time.perf_counter() - t0
        for _ in range(args.rounds):
            for path in paths:
                runs[path].append(decode_once(models[path], ids, args.new, path, args.threads, sparse, lean_configs))
        del models
    else:  # one model in memory: the plain path first, then the same model fused for the lean paths
        for path in paths:
            t0 = time.perf_counter()
            decode_once(model, ids, 2, path, args.threads, sparse, lean_configs)
            first_call_s[path] = time.perf_counter() - t0
            runs[path] = [decode_once(model, ids, args.new, path, args.threads, sparse, lean_configs)
                          for _ in range(args.rounds)]
    reference = runs["generate"][0]["tokens"]
    rows = []
    for path in paths:
        ms = statistics.median(r["ms_per_token"] for r in runs[path])
        rows.append({
            "model": model_name, "variant": label, "path": path, "tokens_per_s": 1e3 / ms, "ms_per_token": ms,
            "weight_bytes_per_token": bytes_per_token, "gbps": bytes_per_token / ms / 1e6,
            "weight_ms_at_gemv_rate": bytes_per_token / gemv / 1e6,
            "overhead_ms": ms - bytes_per_token / gemv / 1e6 if not sparse else None,
            "linears_ms": matmul_ms, "beyond_linears_ms": ms - matmul_ms,
            "prefill_s": statistics.median(r["prefill_s"] for r in runs[path]),
            "first_call_s": first_call_s[path], "same_tokens_as_generate": all(r["tokens"] == reference for r in runs[path]),
            "runs_ms_per_token": [r["ms_per_token"] for r in runs[path]], "interleaved": interleaved,
        })  # fmt: skip
    for row in rows:
        row["speedup_vs_generate"] = rows[0]["ms_per_token"] / row["ms_per_token"]
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    from sparseforge import kernels

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows, gemv_runs = [], []
    jobs = [(name, variant) for name in args.models for variant in (["dense"] if name == "tiny" else args.variants)]
    for name, variant in jobs:
        gemv_runs.append(torch_gemv_gbps(args.threads, args.gemv_mbytes))  # beside every variant: load drifts
        gc.collect()  # the probe's matrix is gone before the model is built
        model, label = build(args.shapes[name], variant, max(512, args.prompt + args.new + 16))
        rows += measure_variant(model, label, name, args, gemv_runs[-1])
        print(f"{name} {label}: done", flush=True)
        del model
        gc.collect()
    gemv = statistics.median(gemv_runs)
    load_after = os.getloadavg()
    print(f"\nbatch 1, {args.threads} threads, prompt {args.prompt}, {args.new} new tokens, greedy, medians of {args.rounds}; "
          f"CPU {host_line()}, isa {kernels.isa()}; torch fp32 GEMV streams {gemv:.1f} GB/s (same run); "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} (a shared machine: compare rows, not runs)")
    for name in args.models:
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in args.shapes[name].items()))
    if not all(r["interleaved"] for r in rows):
        print("rows with interleaved=False ran their paths one after the other (memory), so load drift between them is not evened out")
    print("overhead ms: ms/token minus the weight bytes at the GEMV rate (dense only); beyond linears ms: ms/token minus "
          "the same-run median time of calling the model's linear layers once each (linears ms)")
    print("| model | variant | path | tok/s | ms/token | vs generate | weight MB/token | GB/s | overhead ms | linears ms | "
          "beyond linears ms | first call s | same tokens |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        overhead = "-" if r["overhead_ms"] is None else f"{r['overhead_ms']:.1f}"
        print(f"| {r['model']} | {r['variant']} | {r['path']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | "
              f"{r['speedup_vs_generate']:.2f}x | {r['weight_bytes_per_token'] / 1e6:.1f} | {r['gbps']:.1f} | {overhead} | "
              f"{r['linears_ms']:.1f} | {r['beyond_linears_ms']:.1f} | {r['first_call_s']:.1f} | {r['same_tokens_as_generate']} |")
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "host": host_info(),
              "isa": kernels.isa(), "torch_gemv_gbps": gemv, "gemv_runs_gbps": gemv_runs,
              "loadavg_before": load_before, "loadavg_after": load_after, "rows": rows}  # fmt: skip
    write_json(args.out, result, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
