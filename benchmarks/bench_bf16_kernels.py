"""bf16 compute at batch 64: sparse layers through the bf16 panel product vs torch dense fp32 and bf16, one run.

Stack and masks as ``benchmarks/bench_kernels.py`` (``--layers`` Linear layers alternating (ffn, hidden)
and (hidden, ffn), default 8 x 4096/11008, Bernoulli masks or 2 of every 4). Cells per sparsity:

* ``bf16 <fmt>``: ``sparseforge.ops.linear_bf16`` on bf16 values (the path of
  ``SparseLinear(compute_dtype=torch.bfloat16)``; ``x`` converted to bf16 at each layer's edge), on
  the path :func:`sparseforge.kernels.bf16_path` picks (printed; ``SPARSEFORGE_BF16_PATH`` forces one),
  through ``linear_bf16_auto``: before the timing, :func:`sparseforge.measure.bf16_method.measured_method`
  times the dense-panel and zero-skipping methods once per distinct layer (shape, density) on this
  machine and caches the faster; the ``method`` column says which one ran (``--methods`` also times
  ``panel`` and ``skip`` on their own);
* ``fp32 <fmt>``: the float32 kernels on the same format (``sparseforge.ops.linear``), for the gain;
* torch dense fp32 and bf16 (``F.linear``; bf16 on oneDNN/AMX where the CPU has it), timed before
  and after the sparse cells (the verdicts use the faster of the two medians).

Per cell: median ms per stack pass, weight bytes read, dense-equivalent TFLOP/s (2 * B * out * in /
time: what the panel product executes, zeros included) and the speedup against torch bf16 dense.
Targets (issue 13): faster than torch bf16 dense from 50% (2:4 and bitmap), >= 2x at 90%.

Usage:
    python benchmarks/bench_bf16_kernels.py                    # 8 layers, batch 64 (~3 min)
    python benchmarks/bench_bf16_kernels.py --quick            # 2 layers of 1024/2816 (smoke)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import host_line  # noqa: E402
from bench_output import write_json  # noqa: E402
from bench_kernels import build, label_of, make_layer, shapes  # noqa: E402
from bench_timing import time_fn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# formats timed per sparsity label (bf16 compute and fp32 compute each)
FORMATS = {"50%": ("bitmap",), "2:4": ("nm", "bitmap"), "75%": ("bitmap", "csr"), "90%": ("bitmap", "csr"),
           "95%": ("bitmap", "csr")}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", default="0.5,2:4,0.75,0.9,0.95")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per cell")
    ap.add_argument("--quick", action="store_true", help="2 layers of 1024/2816, 0.5 s per cell")
    ap.add_argument("--methods", action="store_true", help="also time the bf16 panel and skip methods on their own")
    ap.add_argument("--out", type=Path, default=RESULTS / "bf16_kernels.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.ffn, args.budget = 2, 1024, 2816, 0.5
    return args


def _chain(fn, weights, x):
    h = x
    for w in weights:
        h = fn(h, w)
    return h


def _dense_cells(args, x) -> dict[str, float]:
    """torch dense fp32 and bf16 (random weights of the stack's shapes), ms per pass."""
    import torch.nn.functional as F

    out = {}
    for name, dtype in (("torch dense fp32", torch.float32), ("torch dense bf16", torch.bfloat16)):
        ws = [torch.randn(o, i).to(dtype) for o, i in shapes(args)]
        xd = x.to(dtype)
        with torch.inference_mode():
            out[name] = time_fn(lambda: _chain(F.linear, ws, xd), args.budget)["ms"]
        del ws
        gc.collect()
    return out


def _methods(ws, batch: int) -> str:
    """Measure (or read from the tuning cache) the bf16 method of each distinct layer: ``"panel"``,
    ``"skip"`` or e.g. ``"panel/skip"`` (per layer shape, in stack order)."""
    from sparseforge.measure.bf16_method import measured_method

    names = []
    for w in ws[:2]:  # the stack alternates two shapes of the same density
        names.append(measured_method(w, batch, budget_s=0.5)[0])
    return names[0] if len(set(names)) == 1 else "/".join(names)


def _sparse_cells(args, label: str, x) -> list[dict]:
    from functools import partial

    from sparseforge import kernels
    from sparseforge.measure.bf16_method import linear_bf16_auto
    from sparseforge.ops import linear, linear_bf16

    rows = []
    layers = []
    for k, (o, i) in enumerate(shapes(args)):
        w, m = make_layer(o, i, label, seed=k)
        layers.append((w.bfloat16(), m))  # bf16 values: half the memory of the float32 draw
        del w
    for fmt in FORMATS.get(label, ("bitmap",)):
        ws = [build(fmt, w, m, label) for w, m in layers]
        if any(w is None for w in ws):
            continue
        nbytes = sum(w.nbytes for w in ws)
        with torch.inference_mode():
            cells = [("bf16", _methods(ws, args.batch), linear_bf16_auto)]  # the measured method per layer
            if args.methods:
                cells += [("bf16", m, partial(linear_bf16, method=m)) for m in ("panel", "skip")]
            cells.append(("fp32", "lanes", linear))
            for compute, method, fn in cells:
                t = time_fn(lambda: _chain(fn, ws, x), args.budget)["ms"]
                path = kernels.bf16_path() if compute == "bf16" else kernels.isa()
                rows.append({"sparsity": label, "format": fmt, "compute": compute, "method": method, "path": path,
                             "ms": t, "weight_mb": nbytes / 1e6})
        del ws
        gc.collect()
    del layers
    gc.collect()
    return rows


def run(args) -> dict:
    from sparseforge import kernels

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    x = torch.randn(args.batch, args.hidden)
    flops = 2 * args.batch * sum(o * i for o, i in shapes(args))
    t0 = time.time()
    before = _dense_cells(args, x)
    rows = []
    for s in args.sparsities.split(","):
        rows += _sparse_cells(args, label_of(s), x)
    after = _dense_cells(args, x)
    dense = {k: min(before[k], after[k]) for k in before}
    for r in rows:
        r["tflops_dense_equiv"] = flops / (r["ms"] * 1e-3) / 1e12
        r["vs_bf16_dense"] = dense["torch dense bf16"] / r["ms"]
        r["vs_fp32_dense"] = dense["torch dense fp32"] / r["ms"]
    return {"host": host_line(), "threads": args.threads, "batch": args.batch, "layers": args.layers,
            "shape": [args.hidden, args.ffn], "bf16_path": kernels.bf16_path(), "dense_before_ms": before,
            "dense_after_ms": after, "dense_ms": dense, "rows": rows, "seconds": time.time() - t0}


def targets(result: dict) -> list[str]:
    best = {}
    for r in result["rows"]:
        if r["compute"] == "bf16":
            best[r["sparsity"]] = max(best.get(r["sparsity"], 0.0), r["vs_bf16_dense"])
    lines = []
    for label, need in (("50%", 1.0), ("2:4", 1.0), ("90%", 2.0)):
        if label in best:
            verdict = "PASS" if best[label] >= need else "FAIL"
            lines.append(f"{verdict}: bf16 compute at {label}: {best[label]:.2f}x torch bf16 dense (target >= {need:.0f}x)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(f"host: {result['host']}")
    print(f"{args.layers} layers {args.hidden}<->{args.ffn}, batch {args.batch}, {args.threads} threads, "
          f"bf16 path {result['bf16_path']}")
    for k, v in result["dense_ms"].items():
        print(f"{k:<18} {v:8.1f} ms (before {result['dense_before_ms'][k]:.1f}, after {result['dense_after_ms'][k]:.1f})")
    print(f"{'sparsity':<9}{'format':<8}{'compute':<8}{'method':<12}{'path':<13}{'ms':>8}{'MB':>8}{'TFLOP/s':>9}"
          f"{'vs bf16':>9}{'vs fp32':>9}")
    for r in result["rows"]:
        print(f"{r['sparsity']:<9}{r['format']:<8}{r['compute']:<8}{r['method']:<12}{r['path']:<13}{r['ms']:8.1f}"
              f"{r['weight_mb']:8.0f}"
              f"{r['tflops_dense_equiv']:9.2f}{r['vs_bf16_dense']:8.2f}x{r['vs_fp32_dense']:8.2f}x")
    for line in targets(result):
        print(line)
    write_json(args.out, result, indent=2)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
