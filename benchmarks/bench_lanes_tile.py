"""Kernel tiles measured on this host against the built-in rule: what ``lanes_tile="auto"`` gains.

For each (format, sparsity) of one Llama-MLP-shaped layer at batch 64 (the batch-in-lanes kernels),
every candidate tile of :func:`sparseforge.measure.lanes_tile.candidates` is timed interleaved with
the rule (:func:`sparseforge.measure.timing.time_interleaved`, the advisor's noise rules), and the
table gives each candidate's median and its paired speedup over the rule in the same rounds, the
tile the library would choose (:func:`~sparseforge.measure.lanes_tile.measured_tile` on the same
numbers: a candidate wins only when clearly faster) and whether the timing settled. Prints a
markdown table stamped with the host and writes JSON (``--out``).

Usage:
    python benchmarks/bench_lanes_tile.py --quick       # one 1024x2816 layer, 2 cells (~20 s)
    python benchmarks/bench_lanes_tile.py               # 4096x11008, bitmap 50/75%, CSR 90/95%, 2:4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import host_info, host_line  # noqa: E402
from bench_output import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CELLS = (("bitmap", 0.5), ("bitmap", 0.75), ("csr", 0.9), ("csr", 0.95), ("nm", 0.5))
QUICK_CELLS = (("bitmap", 0.5), ("csr", 0.9))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small layer, two cells")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rows", type=int, default=None, help="weight rows (default 4096; quick 1024)")
    p.add_argument("--cols", type=int, default=None, help="weight columns (default 11008; quick 2816)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=None, help="seconds of calls per candidate (default 1.0; quick 0.2)")
    return p.parse_args(argv)


def make_weight(fmt: str, sparsity: float, rows: int, cols: int, seed: int = 0):
    from sparseforge.formats import BitmapWeight, NMWeight
    from sparseforge.formats.csr import CSRWeight

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)  # (out, in)
    if fmt == "nm":
        return NMWeight.from_dense(w, "2:4")  # keeps the 2 largest of every 4
    keep = torch.rand(rows, cols, generator=g) >= sparsity
    return (BitmapWeight if fmt == "bitmap" else CSRWeight).from_dense(w, keep)


def run(args) -> dict:
    from sparseforge import kernels, ops
    from sparseforge.measure.lanes_tile import RULE, candidates
    from sparseforge.measure.timing import time_interleaved

    rows, cols = args.rows or (1024 if args.quick else 4096), args.cols or (2816 if args.quick else 11008)
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 1.0)
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    x = torch.randn(args.batch, cols)  # (B, in)
    out_rows = []
    for fmt, sparsity in QUICK_CELLS if args.quick else CELLS:
        w = make_weight(fmt, sparsity, rows, cols)
        fns = {t.label: (lambda t=t: ops.linear(x, w, None, **t.kwargs())) for t in candidates()}
        with torch.no_grad():
            meas = time_interleaved(fns, budget_s=budget)
        ms = meas.ms()
        best = min(ms, key=ms.get)
        clear = best == RULE.label or (ms[RULE.label] >= 1.03 * ms[best] and meas.separated(best, RULE.label))
        cell = {"format": fmt, "sparsity": sparsity, "shape": [rows, cols], "batch": args.batch, "stable": meas.stable,
                "rounds": meas.rounds, "ms": ms, "choice": best if clear else RULE.label,
                "speedup_vs_rule": {k: meas.ratio(RULE.label, k)[0] for k in ms}}
        out_rows.append(cell)
        print(f"# {fmt} {sparsity:.0%}: chosen {cell['choice']} ({meas.rounds} rounds, "
              f"{'settled' if meas.stable else 'NOT settled'})", flush=True)
    return {"host": host_info(), "threads": args.threads, "isa": kernels.isa(), "loadavg": os.getloadavg(),
            "rows": out_rows}


def markdown(result: dict) -> str:
    labels = list(result["rows"][0]["ms"]) if result["rows"] else []
    lines = [f"lanes-kernel tiles vs the rule, {result['threads']} threads, isa {result['isa']}; "
             f"load {result['loadavg'][0]:.1f}", "",
             "| format | sparsity | " + " | ".join(f"{k} ms (x rule)" for k in labels) + " | chosen | settled |",
             "|---|---:|" + "---:|" * len(labels) + "---|---|"]
    for r in result["rows"]:
        cells = " | ".join(f"{r['ms'][k]:.2f} ({r['speedup_vs_rule'][k]:.2f}x)" for k in labels)
        lines.append(f"| {r['format']} | {r['sparsity']:.0%} | {cells} | {r['choice']} | {'yes' if r['stable'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(host_line(), flush=True)
    result = run(args)
    out = args.out or RESULTS / ("lanes_tile.quick.json" if args.quick else "lanes_tile.json")
    write_json(out, result)
    print(markdown(result))
    print(f"# saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
