"""Sparse kernel benchmark: the layer stack of issue 3, sparse formats vs torch dense, in one run.

Stack: ``--layers`` Linear layers chained, alternating (out, in) = (ffn, hidden) and (hidden, ffn)
(default 8 x 4096/11008: 360.7 M weights, 1.44 GB in fp32, ~45x the 32 MB L3), no bias, no
activation. Every format runs through its ``sparseforge.ops`` custom op (what a model calls), with
``--threads`` threads for both sparseforge and torch. Weights are U(-b, b), b = 1/sqrt(fan_in *
density); masks are Bernoulli(density) per weight, or 2 random kept positions per group of 4.

Reported per cell: median ms per pass of the stack (with q1/q3/min in the JSON), bytes the format
must read, the bandwidth limit ``bytes / streaming bandwidth`` and the cell's time as a fraction of it
(``limit_ms / ms``: 100% = streaming the weights at the measured bandwidth), useful GFLOP/s
(2 * batch * stored entries / time), and speedups against torch dense fp32 and bf16 measured in the
same run. Streaming bandwidth is measured in the same run (torch ``sum`` of a 1 GiB fp32 array,
``--threads`` threads, median of 15) before and after the kernels; the limit uses their mean.

The machine this was written on is shared with other jobs: single numbers are noisy (see
``../shared/research/peer-speed.md``), so read the ratios and medians, and rerun before concluding.

Usage:
    python benchmarks/kernels.py                      # full stack, batch 1 and 64 (~10 min)
    python benchmarks/kernels.py --quick              # 2 small layers, few repeats (smoke, ~1 min)
    python benchmarks/kernels.py --layers 2 --batches 1 --sparsities 0.5,2:4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Peer references for the full 8 x 4096/11008 stack, ms, from ../shared/research/peer-speed.md
# (best of two rounds, 2 threads, same machine). Keys: (batch, sparsity label).
PEERS = {
    (1, "50%"): {"torch CSR int32": 62.1, "DeepSparse": 32.0, "sparselab": 283.0},
    (1, "2:4"): {"torch CSR int32": 63.3, "DeepSparse": 26.1, "sparselab": 276.1},
    (1, "75%"): {"torch CSR int32": 32.7, "DeepSparse": 24.5, "sparselab": 135.7},
    (1, "90%"): {"torch CSR int32": 13.2, "DeepSparse": 19.1, "sparselab": 56.5},
    (1, "95%"): {"torch CSR int32": 6.7, "DeepSparse": 17.8, "sparselab": 25.7},
    (64, "50%"): {"onnxruntime dense": 115.9, "DeepSparse": 96.5},
    (64, "2:4"): {"onnxruntime dense": 115.9, "DeepSparse": 97.1},
    (64, "75%"): {"onnxruntime dense": 115.9, "DeepSparse": 67.5},
    (64, "90%"): {"onnxruntime dense": 115.9, "DeepSparse": 33.7},
    (64, "95%"): {"onnxruntime dense": 115.9, "DeepSparse": 19.7},
}
BEST_DENSE_B1 = 22.0  # min(torch bf16 22.0, onnxruntime 22.6) ms


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="layers in the stack (default 8)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--sparsities", default="0.5,2:4,0.75,0.9,0.95", help="fractions, and/or 2:4")
    p.add_argument("--formats", default="bitmap,bitmap_bf16,csr,nm", help="subset of bitmap,bitmap_bf16,csr,nm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per cell (min 5, max 40 passes)")
    p.add_argument("--bw-mib", type=int, default=1024, help="size of the bandwidth probe array (MiB)")
    p.add_argument("--quick", action="store_true", help="2 layers of 1024/2816, short timing: a smoke run")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/kernels[.quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.ffn, args.budget, args.bw_mib = 2, 1024, 2816, 0.5, 256
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sparsities = [s.strip() for s in args.sparsities.split(",")]
    args.formats = [f.strip() for f in args.formats.split(",")]
    unknown = set(args.formats) - {"bitmap", "bitmap_bf16", "csr", "nm"}
    if unknown:
        p.error(f"unknown formats {sorted(unknown)}")
    return args


def time_fn(fn, budget: float) -> dict:
    """Median wall time of fn() after 2 warm-up calls; passes = clamp(budget / first, 5, 40)."""
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    n = max(5, min(40, math.ceil(budget / max(first, 1e-6))))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    q = statistics.quantiles(ts, n=4)
    return {"ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2], "passes": n}


def bandwidth_gbs(mib: int) -> float:
    """Streaming read bandwidth: torch sum over a ``mib`` MiB fp32 array, median of 15."""
    a = torch.arange(mib * 2**18, dtype=torch.float32)
    a += 1  # touch every page
    ts = []
    for _ in range(15):
        t0 = time.perf_counter()
        a.sum()
        ts.append(time.perf_counter() - t0)
    return a.numel() * 4 / statistics.median(ts) / 1e9


def shapes(args) -> list[tuple[int, int]]:
    """(out, in) per layer, alternating so the chain composes."""
    return [(args.ffn, args.hidden) if k % 2 == 0 else (args.hidden, args.ffn) for k in range(args.layers)]


def make_layer(out: int, inp: int, label: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (out, in) and keep-mask for sparsity label ('0%', '50%', '2:4', ...)."""
    gen = torch.Generator().manual_seed(seed)
    if label == "2:4":
        scores = torch.rand(out, inp // 4, 4, generator=gen)
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(2, dim=2).indices, True)
        mask, density = mask.reshape(out, inp), 0.5
    else:
        density = 1.0 - float(label.rstrip("%")) / 100
        mask = torch.rand(out, inp, generator=gen) < density
    bound = 1.0 / math.sqrt(inp * density)
    w = (torch.rand(out, inp, generator=gen) * 2 - 1) * bound
    return w, mask


def label_of(s: str) -> str:
    return s if ":" in s else f"{round(float(s) * 100)}%"


def build(fmt: str, w: torch.Tensor, mask: torch.Tensor, label: str):
    from sparseforge.formats import BitmapWeight, NMWeight
    from sparseforge.formats.csr import CSRWeight

    if fmt == "bitmap":
        return BitmapWeight.from_dense(w, mask)
    if fmt == "bitmap_bf16":
        return BitmapWeight.from_dense(w.bfloat16(), mask)
    if fmt == "csr":
        return CSRWeight.from_dense(w, mask)
    if fmt == "nm" and label == "2:4":
        return NMWeight.from_dense(w, "2:4", mask)
    return None


def chain(weights, x):
    from sparseforge.ops import linear

    h = x
    for wt in weights:
        h = linear(h, wt)
    return h


def run(args) -> dict:
    from sparseforge import kernels

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    layer_shapes = shapes(args)
    n_weights = sum(o * i for o, i in layer_shapes)
    meta = {
        "layers": layer_shapes, "weights": n_weights, "threads": args.threads, "isa": kernels.isa(),
        "torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "load_avg_start": os.getloadavg(),
    }
    print(f"# stack: {args.layers} layers {layer_shapes[0]}..., {n_weights / 1e6:.1f} M weights; "
          f"isa={meta['isa']}, threads={args.threads}", flush=True)
    bw0 = bandwidth_gbs(args.bw_mib)
    print(f"# streaming bandwidth (before): {bw0:.1f} GB/s", flush=True)
    rows: list[dict] = []
    xs = {b: torch.randn(b, args.hidden, generator=torch.Generator().manual_seed(b)) for b in args.batches}

    # dense baselines (their speed does not depend on the values)
    dense = [make_layer(o, i, "0%", 100 + k)[0] for k, (o, i) in enumerate(layer_shapes)]
    for dtype, name in ((torch.float32, "torch dense fp32"), (torch.bfloat16, "torch dense bf16")):
        ws = [w.to(dtype) for w in dense]
        for b in args.batches:
            x = xs[b].to(dtype)

            def f(ws=ws, x=x):
                with torch.no_grad():
                    h = x
                    for w in ws:
                        h = torch.nn.functional.linear(h, w)
                return h

            t = time_fn(f, args.budget)
            nbytes = sum(w.numel() * w.element_size() for w in ws)
            rows.append({"batch": b, "kernel": name, "sparsity": "0%", "bytes": nbytes, "nnz": n_weights, **t})
            print(f"  B={b:<3} {name:18s} {t['ms']:8.2f} ms", flush=True)
        del ws
    del dense

    for s in args.sparsities:
        label = label_of(s)
        fmts = [f for f in args.formats if f != "nm" or label == "2:4"]
        built: dict[str, list] = {f: [] for f in fmts}
        first_dense = None
        for k, (o, i) in enumerate(layer_shapes):
            w, mask = make_layer(o, i, label, 1000 * k + 7)
            if k == 0:
                first_dense = torch.where(mask, w, torch.zeros(()))
            for f in fmts:
                wt = build(f, w, mask, label)
                if wt is not None:
                    built[f].append(wt)
            del w, mask
        for f, ws in built.items():
            if not ws:
                continue
            nbytes = sum(wt.nbytes for wt in ws)
            nnz = sum(wt.nnz for wt in ws)
            for b in args.batches:
                x = xs[b]
                y1 = chain(ws[:1], x)
                ref = torch.nn.functional.linear(x, first_dense.to(ws[0].dtype).float())
                err = float((y1 - ref).norm() / ref.norm().clamp_min(1e-30))
                t = time_fn(lambda: chain(ws, x), args.budget)
                rows.append({"batch": b, "kernel": f, "sparsity": label, "bytes": nbytes, "nnz": nnz,
                             "rel_err_layer0": err, **t})
                print(f"  B={b:<3} {f:18s} {label:>4} {t['ms']:8.2f} ms  ({nbytes / 1e6:.0f} MB, err {err:.1e})", flush=True)
        del built, first_dense

    bw1 = bandwidth_gbs(args.bw_mib)
    print(f"# streaming bandwidth (after): {bw1:.1f} GB/s", flush=True)
    bw = (bw0 + bw1) / 2
    meta.update(bandwidth_gbs_before=bw0, bandwidth_gbs_after=bw1, bandwidth_gbs=bw, load_avg_end=os.getloadavg())
    dense_ms = {(r["batch"], r["kernel"]): r["ms"] for r in rows if r["kernel"].startswith("torch")}
    for r in rows:
        r["limit_ms"] = r["bytes"] / (bw * 1e9) * 1e3
        r["frac_of_limit"] = r["limit_ms"] / r["ms"]
        r["gflops"] = 2 * r["batch"] * r["nnz"] / (r["ms"] * 1e-3) / 1e9
        r["vs_torch_fp32"] = dense_ms[(r["batch"], "torch dense fp32")] / r["ms"]
        r["vs_torch_bf16"] = dense_ms[(r["batch"], "torch dense bf16")] / r["ms"]
    return {"meta": meta, "rows": rows, "full_stack": (args.layers, args.hidden, args.ffn) == (8, 4096, 11008)}


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"Stack {len(meta['layers'])} x {meta['layers'][0]}, {meta['weights'] / 1e6:.1f} M weights, "
        f"{meta['threads']} threads, isa {meta['isa']}, torch {meta['torch']}. Streaming bandwidth "
        f"{meta['bandwidth_gbs_before']:.1f} GB/s before, {meta['bandwidth_gbs_after']:.1f} after "
        f"(limit uses {meta['bandwidth_gbs']:.1f}). Load average {meta['load_avg_start'][0]:.1f} at start, "
        f"{meta['load_avg_end'][0]:.1f} at end (2 cores; other jobs share the machine).",
        "",
        "| batch | kernel | sparsity | ms (median) | q1-q3 | MB read | BW limit ms | % of limit | GFLOP/s | vs torch fp32 | vs torch bf16 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["batch"], r["sparsity"] != "0%", r["sparsity"], r["kernel"])):
        lines.append(
            f"| {r['batch']} | {r['kernel']} | {r['sparsity']} | {r['ms']:.2f} | {r['q1_ms']:.1f}-{r['q3_ms']:.1f} | "
            f"{r['bytes'] / 1e6:.0f} | {r['limit_ms']:.2f} | {100 * r['frac_of_limit']:.0f}% | {r['gflops']:.0f} | "
            f"{r['vs_torch_fp32']:.2f}x | {r['vs_torch_bf16']:.2f}x |"
        )
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    """PASS/FAIL lines for the issue's targets (peer numbers only apply to the full stack)."""
    out = []
    by = {(r["batch"], r["kernel"], r["sparsity"]): r for r in result["rows"]}
    for (b, k, s) in [(1, "bitmap", "50%"), (1, "nm", "2:4"), (1, "bitmap", "75%"), (1, "csr", "90%"), (1, "csr", "95%")]:
        r = by.get((b, k, s))
        if r:
            out.append(f"{'PASS' if r['frac_of_limit'] >= 0.7 else 'FAIL'}: B=1 {k} {s} at {100 * r['frac_of_limit']:.0f}% of the bandwidth limit (target >= 70%)")
    if not result["full_stack"]:
        out.append("(peer comparisons skipped: they were measured on the full 8 x 4096/11008 stack)")
        return out
    for (b, s), peers in PEERS.items():
        cands = [r for (bb, k, ss), r in by.items() if bb == b and ss == s and not k.startswith("torch") and k != "bitmap_bf16"]
        if not cands:
            continue
        best = min(cands, key=lambda r: r["ms"])
        for peer, ms in peers.items():
            out.append(f"{'PASS' if best['ms'] < ms else 'FAIL'}: B={b} {s} best fp32 sparse ({best['kernel']} {best['ms']:.1f} ms) vs {peer} {ms} ms")
        if b == 1 and s in ("50%", "2:4", "75%", "90%", "95%"):
            out.append(f"{'PASS' if best['ms'] < BEST_DENSE_B1 else 'FAIL'}: B=1 {s} {best['kernel']} {best['ms']:.1f} ms vs best dense (torch bf16 / onnxruntime) {BEST_DENSE_B1} ms")
        if b == 64:
            t32 = by.get((64, "torch dense fp32", "0%"))
            if t32:
                out.append(f"{'PASS' if best['ms'] < t32['ms'] else 'FAIL'}: B=64 {s} {best['kernel']} {best['ms']:.1f} ms vs torch dense fp32 {t32['ms']:.1f} ms (same run)")
    for s in ("75%", "90%", "95%"):
        r, d = by.get((64, "bitmap_bf16", s)), by.get((64, "torch dense bf16", "0%"))
        if r and d:
            out.append(f"{'PASS' if r['ms'] < d['ms'] else 'FAIL'}: B=64 {s} bitmap bf16 {r['ms']:.1f} ms vs torch dense bf16 {d['ms']:.1f} ms (same run)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    finally:
        torch.set_flush_denormal(False)  # process-wide CPU state: do not leak it to a caller (tests)
    result["targets"] = targets(result)
    table = markdown(result)
    print()
    print(table)
    print()
    print("\n".join(result["targets"]))
    out = args.out or RESULTS / ("kernels.quick.json" if args.quick else "kernels.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table + "\n\n" + "\n".join(result["targets"]) + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
