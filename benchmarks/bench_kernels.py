"""Sparse kernel benchmark: the layer stack of issue 3, sparse formats vs torch dense, in one run.

Stack: ``--layers`` Linear layers chained, alternating (out, in) = (ffn, hidden) and (hidden, ffn)
(default 8 x 4096/11008: 360.7 M weights, 1.44 GB in fp32, far beyond any last-level cache), no bias, no
activation. Every format runs through its ``sparseforge.ops`` custom op (what a model calls), with
``--threads`` threads for both sparseforge and torch. Weights are U(-b, b), b = 1/sqrt(fan_in *
density); masks are Bernoulli(density) per weight, or 2 random kept positions per group of 4.

Reported per cell: median ms per pass of the stack (with q1/q3/min in the JSON), bytes the format
must read, the bandwidth limit ``bytes / streaming bandwidth`` and the cell's time as a fraction of it
(``limit_ms / ms``: 100% = streaming the weights at the measured bandwidth), useful GFLOP/s
(2 * batch * stored entries / time), and speedups against torch dense fp32 and bf16 measured in the
same run. Streaming bandwidth is measured in the same run (torch ``sum`` of a 1 GiB fp32 array,
``--threads`` threads, median of 15) before and after the kernels; the limit uses their mean.

int8 cells (``bitmap_i8``, ``nm_i8``, ``csr_i8``: int8 values with float32 row scales, ``sparseforge.ops.int8``)
are also judged by the bytes bound of issue 13: ``bytes read / (rate torch's dense fp32 GEMV streams its
weights at, same run, batch 1)`` against the cell's time (``% of bytes bound``; target >= 90% at batch 1).

On a machine shared with other jobs single numbers are noisy, so read the ratios and medians, and
rerun before concluding.

Usage:
    python benchmarks/bench_kernels.py                      # full stack, batch 1 and 64 (~10 min)
    python benchmarks/bench_kernels.py --quick              # 2 small layers, few repeats (smoke, ~1 min)
    python benchmarks/bench_kernels.py --layers 2 --batches 1 --sparsities 0.5,2:4
    python benchmarks/bench_kernels.py --peers              # + DeepSparse / onnxruntime in the same run (~20 min)

With ``--peers`` every sparsity's sparseforge cells are followed by DeepSparse on a stack of the same
shapes and masks of the same distribution (benchmarks/bench_peers.py, its own process and venv), and the
dense baselines by onnxruntime. Every PASS / FAIL compares numbers measured in this run; the recorded
reference numbers (:data:`REFERENCE_PEERS_MS`, :data:`REFERENCE_BEST_DENSE_B1_MS`) are printed beside
them as ``CONTEXT`` lines, never judged.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import time_fn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Recorded peer times for the full 8 x 4096/11008 stack, ms (best of two rounds, 2 threads, measured
# once on another day and CPU). Context only: printed as CONTEXT lines, never a PASS / FAIL.
# Keys: (batch, sparsity label).
REFERENCE_PEERS_MS = {
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
REFERENCE_BEST_DENSE_B1_MS = 22.0  # recorded min(torch bf16 22.0, onnxruntime 22.6) ms; context only


FORMATS = ("bitmap", "bitmap_bf16", "csr", "nm", "bitmap_i8", "nm_i8", "csr_i8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="layers in the stack (default 8)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--sparsities", default="0.5,2:4,0.75,0.9,0.95", help="fractions, and/or 2:4")
    p.add_argument("--formats", default="bitmap,bitmap_bf16,csr,nm,bitmap_i8,nm_i8,csr_i8",
                   help="subset of " + ",".join(FORMATS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per cell (min 5, max 40 passes)")
    p.add_argument("--bw-mib", type=int, default=1024, help="size of the bandwidth probe array (MiB)")
    p.add_argument("--quick", action="store_true", help="2 layers of 1024/2816, short timing: a smoke run")
    p.add_argument("--peers", action="store_true",
                   help="also time DeepSparse 1.8.0 and onnxruntime (dense) on the same stack in this run, "
                        "each cell in its own process from a separate venv (.bench/peers-venv, created on first use)")
    p.add_argument("--peer-python", type=Path, default=None, help="Python with deepsparse/onnxruntime (implies --peers)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/kernels[.quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.ffn, args.budget, args.bw_mib = 2, 1024, 2816, 0.5, 256
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sparsities = [s.strip() for s in args.sparsities.split(",")]
    args.formats = [f.strip() for f in args.formats.split(",")]
    args.peers = args.peers or args.peer_python is not None
    unknown = set(args.formats) - set(FORMATS)
    if unknown:
        p.error(f"unknown formats {sorted(unknown)}")
    return args


def bandwidth_gbs(mib: int) -> float:
    """Streaming read bandwidth: torch sum over a ``mib`` MiB fp32 array, median of 15.

    The array is in transparent huge pages where the OS allows it, like the formats' buffers
    (``sparseforge/formats/memory.py``): with 4 KB pages the same sum streamed up to ~1.8x slower
    in some phases of this host (39.7 vs 71.7 GB/s back to back), which flattered the kernels.
    """
    from sparseforge.formats.memory import hugepage_backed

    a = hugepage_backed(torch.arange(mib * 2**18, dtype=torch.float32))
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
    if fmt == "bitmap_i8":
        return BitmapWeight.from_dense(w, mask, values_dtype=torch.int8)
    if fmt == "csr_i8":
        return CSRWeight.from_dense(w, mask, values_dtype=torch.int8)
    if fmt == "nm_i8" and label == "2:4":
        return NMWeight.from_dense(w, "2:4", mask, values_dtype=torch.int8)
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
    peer_python = None
    if args.peers:
        from bench_peers import ensure_venv, run_peer

        peer_python = args.peer_python or ensure_venv(Path(__file__).resolve().parents[1] / ".bench" / "peers-venv")
        stack = {"layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "threads": args.threads, "budget": args.budget}

        def peer_row(tool: str, b: int, sparsity: str, label: str, name: str) -> None:
            cell = run_peer(peer_python, tool, batch=b, sparsity=sparsity, **stack)
            rows.append({"batch": b, "kernel": name, "sparsity": label, "bytes": None, "nnz": None, "peer": cell,
                         **{k: cell[k] for k in ("ms", "min_ms", "q1_ms", "q3_ms", "passes")}})
            print(f"  B={b:<3} {name:18s} {label:>4} {cell['ms']:8.2f} ms  (same run; error vs fp64 {cell['rel_l2_error']:.1e})", flush=True)

        for b in args.batches:
            peer_row("onnxruntime", b, "0", "0%", "onnxruntime dense fp32")

    probes = [bw0]  # bandwidth before each sparsity's cells: the host's bandwidth changes phase within minutes
    for s in args.sparsities:
        label = label_of(s)
        probes.append(bandwidth_gbs(args.bw_mib))
        print(f"# streaming bandwidth: {probes[-1]:.1f} GB/s", flush=True)
        first_row = len(rows)
        fmts = [f for f in args.formats if not f.startswith("nm") or label == "2:4"]
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
                # int8 cells: against their own dequantized weight (the kernel's error, not the quantizer's)
                w0 = ws[0].to_dense() if ws[0].dtype == torch.int8 else first_dense.to(ws[0].dtype).float()
                ref = torch.nn.functional.linear(x, w0)
                err = float((y1 - ref).norm() / ref.norm().clamp_min(1e-30))
                t = time_fn(lambda: chain(ws, x), args.budget)
                rows.append({"batch": b, "kernel": f, "sparsity": label, "bytes": nbytes, "nnz": nnz,
                             "rel_err_layer0": err, **t})
                print(f"  B={b:<3} {f:18s} {label:>4} {t['ms']:8.2f} ms  ({nbytes / 1e6:.0f} MB, err {err:.1e})", flush=True)
        del built, first_dense
        for r in rows[first_row:]:
            r["bw_probe"] = len(probes) - 1  # the probe after these cells is the next one (the next block's, or bw1)
        if peer_python is not None:
            for b in args.batches:
                peer_row("deepsparse", b, s, label, "DeepSparse 1.8.0")

    bw1 = bandwidth_gbs(args.bw_mib)
    print(f"# streaming bandwidth (after): {bw1:.1f} GB/s", flush=True)
    probes.append(bw1)
    bw = (bw0 + bw1) / 2
    meta.update(bandwidth_gbs_before=bw0, bandwidth_gbs_after=bw1, bandwidth_gbs=bw, bandwidth_probes=probes,
                load_avg_end=os.getloadavg())
    # each sparsity's cells are judged with the mean of the probes just before and just after them
    for r in rows:
        if "bw_probe" in r:
            i = r.pop("bw_probe")
            r["bandwidth_gbs"] = (probes[i] + probes[i + 1]) / 2
    dense_ms = {(r["batch"], r["kernel"]): r["ms"] for r in rows if r["kernel"].startswith("torch")}
    fp32_gemv = next((r for r in rows if r["batch"] == 1 and r["kernel"] == "torch dense fp32"), None)
    gemv_gbs = fp32_gemv["bytes"] / (fp32_gemv["ms"] * 1e-3) / 1e9 if fp32_gemv else None
    meta["dense_fp32_gemv_gbs"] = gemv_gbs
    for r in rows:
        if r["bytes"] is not None:  # peers: bytes read and useful work unknown
            r["limit_ms"] = r["bytes"] / (r.get("bandwidth_gbs", bw) * 1e9) * 1e3
            r["frac_of_limit"] = r["limit_ms"] / r["ms"]
            r["gflops"] = 2 * r["batch"] * r["nnz"] / (r["ms"] * 1e-3) / 1e9
            if gemv_gbs:  # the bytes bound: this cell's bytes at the rate torch's dense fp32 GEMV streams
                r["bytes_bound_ms"] = r["bytes"] / (gemv_gbs * 1e9) * 1e3
                r["frac_of_bytes_bound"] = r["bytes_bound_ms"] / r["ms"]
        r["vs_torch_fp32"] = dense_ms[(r["batch"], "torch dense fp32")] / r["ms"]
        r["vs_torch_bf16"] = dense_ms[(r["batch"], "torch dense bf16")] / r["ms"]
    return {"meta": meta, "rows": rows, "full_stack": (args.layers, args.hidden, args.ffn) == (8, 4096, 11008)}


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"Stack {len(meta['layers'])} x {meta['layers'][0]}, {meta['weights'] / 1e6:.1f} M weights, "
        f"{meta['threads']} threads, isa {meta['isa']}, torch {meta['torch']}. Streaming bandwidth "
        f"{meta['bandwidth_gbs_before']:.1f} GB/s before, {meta['bandwidth_gbs_after']:.1f} after "
        f"(probes before each sparsity: {', '.join(f'{b:.0f}' for b in meta.get('bandwidth_probes', []))}; each sparsity's "
        f"limit uses the mean of the probes around its cells, the dense rows {meta['bandwidth_gbs']:.1f}). Load average {meta['load_avg_start'][0]:.1f} at start, "
        f"{meta['load_avg_end'][0]:.1f} at end (2 cores; other jobs share the machine).",
        "",
        f"Bytes bound: bytes read at the rate torch's dense fp32 GEMV streamed its weights in this run "
        f"({meta.get('dense_fp32_gemv_gbs') or float('nan'):.1f} GB/s at batch 1).",
        "",
        "| batch | kernel | sparsity | ms (median) | q1-q3 | MB read | BW limit ms | % of limit | % of bytes bound | GFLOP/s | vs torch fp32 | vs torch bf16 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["batch"], r["sparsity"] != "0%", r["sparsity"], r["kernel"])):
        own = r["bytes"] is not None
        lines.append(
            f"| {r['batch']} | {r['kernel']} | {r['sparsity']} | {r['ms']:.2f} | {r['q1_ms']:.1f}-{r['q3_ms']:.1f} | "
            + (f"{r['bytes'] / 1e6:.0f} | {r['limit_ms']:.2f} | {100 * r['frac_of_limit']:.0f}% | "
               f"{100 * r.get('frac_of_bytes_bound', float('nan')):.0f}% | {r['gflops']:.0f} | " if own else "- | - | - | - | - | ")
            + f"{r['vs_torch_fp32']:.2f}x | {r['vs_torch_bf16']:.2f}x |"
        )
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    """PASS / FAIL lines for the issue's targets, each from numbers measured in this run; CONTEXT lines
    set the best kernel beside the recorded reference numbers (full stack only), without a verdict."""
    out = []
    by = {(r["batch"], r["kernel"], r["sparsity"]): r for r in result["rows"]}
    for (b, k, s) in [(1, "bitmap", "50%"), (1, "nm", "2:4"), (1, "bitmap", "75%"), (1, "csr", "90%"), (1, "csr", "95%")]:
        r = by.get((b, k, s))
        if r:
            out.append(f"{'PASS' if r['frac_of_limit'] >= 0.7 else 'FAIL'}: B=1 {k} {s} at {100 * r['frac_of_limit']:.0f}% of the bandwidth limit (target >= 70%)")
    for (b, k, s) in [(1, "bitmap_i8", "50%"), (1, "nm_i8", "2:4"), (1, "csr_i8", "90%")]:
        r = by.get((b, k, s))
        if r and "frac_of_bytes_bound" in r:
            out.append(f"{'PASS' if r['frac_of_bytes_bound'] >= 0.9 else 'FAIL'}: B=1 {k} {s} at "
                       f"{100 * r['frac_of_bytes_bound']:.0f}% of the bytes bound (target >= 90%)")
    full = result["full_stack"]
    if not full:
        out.append("(the recorded reference numbers apply to the full 8 x 4096/11008 stack only; same-run peers below)")
    same_run = {"DeepSparse": lambda b, s: by.get((b, "DeepSparse 1.8.0", s)),
                "onnxruntime dense": lambda b, s: by.get((b, "onnxruntime dense fp32", "0%"))}
    for (b, s), peers in REFERENCE_PEERS_MS.items():
        cands = [r for (bb, k, ss), r in by.items()
                 if bb == b and ss == s and r["bytes"] is not None and not k.startswith("torch")
                 and k not in ("bitmap_bf16", "bitmap_i8", "nm_i8", "csr_i8")]
        if not cands:
            continue
        best = min(cands, key=lambda r: r["ms"])
        for peer, ms in peers.items():
            mine = f"B={b} {s} best fp32 sparse ({best['kernel']} {best['ms']:.1f} ms)"
            measured = same_run[peer](b, s) if peer in same_run else None
            # the issue asks batch 64 to beat DeepSparse from 75% only: below that the line is information
            verdict = (lambda ok: "INFO" if (b == 64 and peer == "DeepSparse" and s in ("50%", "2:4"))
                       else ("PASS" if ok else "FAIL"))
            if measured:
                out.append(f"{verdict(best['ms'] < measured['ms'])}: {mine} vs {peer} {measured['ms']:.1f} ms (same run)")
            if full:
                out.append(f"CONTEXT: {mine} vs {peer} {ms} ms (recorded reference, not judged)")
        if b == 1 and s in ("50%", "2:4", "75%", "90%", "95%"):
            dense_now = [r["ms"] for r in (by.get((1, "torch dense bf16", "0%")), same_run["onnxruntime dense"](1, s)) if r]
            if dense_now:
                out.append(f"{'PASS' if best['ms'] < min(dense_now) else 'FAIL'}: B=1 {s} {best['kernel']} {best['ms']:.1f} ms vs best dense "
                           f"(torch bf16 / onnxruntime) {min(dense_now):.1f} ms (same run)")
            if full:
                out.append(f"CONTEXT: B=1 {s} {best['kernel']} {best['ms']:.1f} ms vs best dense (torch bf16 / onnxruntime) "
                           f"{REFERENCE_BEST_DENSE_B1_MS} ms (recorded reference, not judged)")
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
