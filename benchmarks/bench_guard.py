"""Regression guard: short versions of the headline speed ratios, each against a stated floor, on this host.

Run it before a kernel change lands (a few minutes; not part of ``make test``, whose time must stay
low): ``make bench-guard`` or ``python benchmarks/bench_guard.py``. Every ratio is measured in this
run against its own baseline, candidates interleaved round by round
(:func:`sparseforge.measure.timing.time_interleaved`), so a slower or busier machine moves both
sides alike. A ratio below its floor fails the run (exit 1) and names the check; when the timing did
not settle (another job competing), the line says so and the run exits 2 ("rerun on a quiet
machine"), never a silent pass.

Checks (floors are set below what the issue-17 hosts reached, so a real regression trips them and
noise does not):

* ``stack b1``: 2 layers 4096<->11008, batch 1: bitmap 50%, N:M 2:4, CSR 90% vs torch dense fp32;
* ``stack b64``: the same layers at batch 64, CSR 90% vs torch dense bf16 (the best dense path);
* ``moe decode``: one MoE layer (d 1024, hidden 2816, E 8, top-2), one token: the layer's measured
  ``decode_backend="auto"`` vs the torch path;
* ``decode``: a 4-layer Llama-shaped model (hidden 1024), 2:4 and 75% compressed vs dense fp32,
  16 new tokens.

Usage:
    python benchmarks/bench_guard.py            # every check (~3 min)
    python benchmarks/bench_guard.py --only stack
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import host_info, host_line  # noqa: E402
from bench_kernels import make_layer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# check name -> minimum speedup (baseline time / candidate time), on any host the project runs on
FLOORS = {
    "stack b1: bitmap 50% / dense fp32": 1.25,
    "stack b1: nm 2:4 / dense fp32": 1.25,
    "stack b1: csr 90% / dense fp32": 3.0,
    "stack b64: csr 90% / dense bf16": 0.8,
    "moe decode: auto / torch path": 0.95,
    "decode: 2:4 / dense fp32": 1.15,
    "decode: 75% / dense fp32": 1.5,
}


def stack_checks(threads: int, budget: float) -> list[dict]:
    from sparseforge.formats import BitmapWeight, NMWeight
    from sparseforge.formats.csr import CSRWeight
    from sparseforge.ops import linear
    from sparseforge.measure.timing import time_interleaved

    shapes = [(11008, 4096), (4096, 11008)]
    layers = {label: [make_layer(o, i, label, seed=7 + k) for k, (o, i) in enumerate(shapes)]
              for label in ("50%", "2:4", "90%")}
    dense = [w * m for w, m in layers["90%"]]  # dense cost does not depend on the zeros
    fmts = {"bitmap 50%": [BitmapWeight.from_dense(w, m) for w, m in layers["50%"]],
            "nm 2:4": [NMWeight.from_dense(w, "2:4", m) for w, m in layers["2:4"]],
            "csr 90%": [CSRWeight.from_dense(w, m) for w, m in layers["90%"]]}
    dense_bf16 = [w.bfloat16() for w in dense]

    def chain(ws, x, op):
        for w in ws:
            x = op(x, w)
        return x

    out = []
    for batch in (1, 64):
        x = torch.randn(batch, 4096)
        fns = {"dense fp32": lambda: chain(dense, x, torch.nn.functional.linear),
               "dense bf16": lambda: chain(dense_bf16, x.bfloat16(), torch.nn.functional.linear)}
        for name, ws in fmts.items():
            if batch == 1 or name == "csr 90%":
                fns[name] = lambda ws=ws: chain(ws, x, linear)
        with torch.inference_mode():
            m = time_interleaved(fns, budget_s=budget, rel_tol=0.02, min_rounds=7)
        ms = m.ms()
        base = "dense fp32" if batch == 1 else "dense bf16"
        for name in fns:
            if not name.startswith("dense"):
                out.append({"check": f"stack b{batch}: {name} / {base}", "ratio": ms[base] / ms[name],
                            "ms": {base: ms[base], name: ms[name]}, "stable": m.stable})
    return out


def moe_check(budget: float) -> list[dict]:
    from sparseforge.moe import MoE
    from sparseforge.measure.timing import time_interleaved

    torch.manual_seed(0)
    auto = MoE(1024, 2816, 8, 2).eval()
    torch_path = copy.deepcopy(auto)
    torch_path.decode_backend = "torch"
    x = torch.randn(1, 1024)
    with torch.no_grad():
        auto(x)  # measures its decode backend (or reads the tuning cache)
        m = time_interleaved({"auto": lambda: auto(x), "torch": lambda: torch_path(x)}, budget_s=budget, min_rounds=7)
    ms = m.ms()
    choice = auto.decode_choice[1].name
    return [{"check": "moe decode: auto / torch path", "ratio": ms["torch"] / ms["auto"], "ms": ms,
             "stable": m.stable, "detail": f"auto chose {choice}"}]


def decode_checks(threads: int, repeats: int) -> list[dict]:
    import statistics

    import transformers as t

    import sparseforge as sf
    from sparseforge import kernels
    from sparseforge.evaluation.speed import generate_seconds
    from sparseforge.runtime.compress import compress_

    torch.manual_seed(0)
    cfg = t.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                        num_key_value_heads=16, vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=False)
    dense = t.LlamaForCausalLM(cfg).float().eval()
    models = {"dense fp32": (dense, False)}
    for label, kw in (("2:4", dict(pattern="2:4")), ("75%", dict(pattern="unstructured", sparsity=0.75))):
        m = copy.deepcopy(dense)
        sf.sparsify_(m, sf.SparsifyConfig(method="magnitude", **kw), progress=False)
        compress_(m, format="rule")
        models[label] = (m, True)
    prompt = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in models}
    for _ in range(repeats + 1):
        for name, (model, sparse) in models.items():
            ctx = kernels.sparse_threads(threads) if sparse else torch.inference_mode()
            with ctx:
                times[name].append(generate_seconds(model, prompt, 16))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first round warms up
    return [{"check": f"decode: {k} / dense fp32", "ratio": med["dense fp32"] / med[k],
             "ms": {"dense fp32": med["dense fp32"] * 1e3 / 16, k: med[k] * 1e3 / 16}, "stable": True,
             "detail": "ms per token"} for k in ("2:4", "75%")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of calls per candidate and check")
    p.add_argument("--only", choices=["stack", "moe", "decode"], default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "guard.json")
    args = p.parse_args(argv)
    from sparseforge.runtime.machine import set_threads

    set_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    if args.only in (None, "stack"):
        rows += stack_checks(args.threads, args.budget)
    if args.only in (None, "moe"):
        rows += moe_check(args.budget)
    if args.only in (None, "decode"):
        rows += decode_checks(args.threads, repeats=5)
    print(f"host: {host_line()}; {args.threads} threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| check | ratio | floor | times (ms) | verdict |\n|---|---:|---:|---|---|")
    worst = 0
    for r in rows:
        floor = FLOORS[r["check"]]
        ok = r["ratio"] >= floor
        r["floor"], r["verdict"] = floor, "PASS" if ok else ("UNSETTLED" if not r["stable"] else "FAIL")
        worst = max(worst, 0 if ok else (2 if not r["stable"] else 1))
        times = ", ".join(f"{k} {v:.2f}" for k, v in r["ms"].items()) + (f" ({r['detail']})" if r.get("detail") else "")
        print(f"| {r['check']} | {r['ratio']:.2f}x | {floor:.2f}x | {times} | {r['verdict']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"host": host_info(), "rows": rows, "seconds": time.perf_counter() - t0}, indent=1))
    tmp.replace(args.out)
    verdict = {0: "all checks PASS", 1: "a ratio fell below its floor: FAIL",
               2: "a check below its floor did not settle (busy machine): rerun on a quiet machine"}[worst]
    print(f"\n{verdict} ({time.perf_counter() - t0:.0f} s); JSON: {args.out}")
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
