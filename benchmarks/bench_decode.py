"""Generation tokens/s at batch 1: a Llama-shaped random model, dense fp32 vs compress_ed (2:4, 75%).

Issue 3's end-to-end target (2:4 >= 1.8x and 75% >= 3x dense fp32 tokens/s). The model has random
weights (no download): by default the issue's shape, hidden 2048, 16 layers, FFN 5632, vocab 8192
(3.4 GB in fp32); it is pruned with ``sparsify_`` (magnitude, 2:4 and 75% unstructured) and
compressed with ``compress_(format="auto")``, which measures each layer shape at batch 1 and keeps
the fastest format (the report lists the formats chosen); ``lm_head`` and the embeddings stay dense. Each variant generates
``--new`` tokens greedily after an 8-token prompt (``min_new_tokens`` forces the full length);
``--repeats`` runs per variant, interleaved, median reported, and ratios come from the same run
(the machine is shared and noisy: absolute numbers move, ratios less). The sparse variants run inside
``sparseforge.kernels.sparse_threads`` (torch single-threaded, the kernels on all threads; dense
keeps torch's threads): torch's spinning OpenMP workers would otherwise take the kernels' cores.
``--no-sparse-threads`` measures that naive setting.

    python benchmarks/bench_decode.py --quick     # hidden 256, 2 layers, FFN 704 (smoke, ~20 s)
    python benchmarks/bench_decode.py             # the default shape; writes benchmarks/results/decode.json
"""

from __future__ import annotations

import argparse
import copy
from contextlib import nullcontext
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, few tokens (smoke run)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--new", type=int, default=32, help="generated tokens per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts (torch and the sparse kernels alike), each measured in turn")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/decode.json, quick: decode.quick.json)")
    p.add_argument("--sparse-threads", action=argparse.BooleanOptionalAction, default=True,
                   help="run the sparse variants inside kernels.sparse_threads (torch 1 thread, kernels N): "
                        "torch's spinning OpenMP workers otherwise take the kernels' cores")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.ffn, args.vocab, args.new, args.repeats = 256, 2, 704, 1024, 16, 2
    if args.out is None:
        args.out = RESULTS / ("decode.quick.json" if args.quick else "decode.json")
    return args


def build_model(args):
    import transformers as t

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = t.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=args.vocab,
                        max_position_embeddings=max(256, args.new + 16), tie_word_embeddings=False)
    return t.LlamaForCausalLM(cfg).float().eval()


def variants(dense, args) -> dict:
    import sparseforge as sf
    from sparseforge.runtime.compress import compress_

    out = {"dense fp32": (dense, None)}
    for label, kw in (("2:4", dict(pattern="2:4")), ("75%", dict(pattern="unstructured", sparsity=0.75))):
        model = copy.deepcopy(dense)
        sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", **kw), progress=False)
        report = compress_(model)
        fmts = sorted({c.format for c in report.converted})
        out[f"{label} ({', '.join(fmts)})"] = (model, report)
    return out


def measure(models, prompt, args, threads: int) -> list[dict]:
    from sparseforge import kernels
    from sparseforge.evaluation.speed import generate_seconds

    torch.set_num_threads(threads)
    kernels.set_num_threads(threads)
    def threads_for(report):
        return kernels.sparse_threads(threads) if report is not None and args.sparse_threads else nullcontext()

    for model, report in models.values():  # warm-up (thread pools, allocator)
        with threads_for(report):
            generate_seconds(model, prompt, 2)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):  # interleaved, so drifting load hits every variant alike
        for name, (model, report) in models.items():
            with threads_for(report):
                times[name].append(generate_seconds(model, prompt, args.new))
    base = statistics.median(times["dense fp32"])
    rows = []
    for name, (model, report) in models.items():
        med = statistics.median(times[name])
        rows.append({"threads": threads, "variant": name, "tokens_per_s": args.new / med, "median_s": med,
                     "speedup": base / med, "runs_s": times[name],
                     "sparse_bytes": sum(c.nbytes for c in report.converted) if report else None,
                     "dense_bytes": sum(c.dense_bytes for c in report.converted) if report else None})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    from sparseforge import kernels

    dense = build_model(args)
    models = variants(dense, args)
    prompt = torch.randint(1, args.vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    load_before = os.getloadavg()
    rows = [r for t in args.threads for r in measure(models, prompt, args, t)]
    result = {"shape": {k: getattr(args, k) for k in ("hidden", "layers", "ffn", "vocab")},
              "new_tokens": args.new, "batch": 1, "repeats": args.repeats, "isa": kernels.isa(),
              "sparse_threads": args.sparse_threads,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}
    print(f"decode, batch 1, {args.new} new tokens, hidden {args.hidden}, {args.layers} layers, FFN {args.ffn}, "
          f"vocab {args.vocab}, isa {result['isa']}, load {load_before[0]:.1f} -> {result['loadavg_after'][0]:.1f}")
    print("| threads | variant | tokens/s | median s | vs dense fp32 (same threads) |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['threads']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['median_s']:.3f} | {r['speedup']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
