"""Structured RigL's CPU claim, checked with our constant fan-in format.

Lasby et al. 2023 (SRigL) report a constant fan-in linear layer "3.6x/2x faster at 90% sparsity
than equivalent dense/unstructured sparse layers" in online inference (batch 1) on CPU. Here one
layer of each shape is pruned to a constant fan-in mask at 90% (every output row keeps the same
number of inputs, the SRigL pattern, via ``mask_from_scores(..., FanIn(), 0.9)``) and timed by the
advisor's protocol (:func:`sparseforge.runtime.advise.measure_layer`: interleaved calls, medians, weights
streamed from memory): dense ``F.linear``, our fan-in kernel, and the same mask as CSR and bitmap
(the "unstructured sparse" formats).

    python benchmarks/bench_fanin_speed.py              # writes benchmarks/results/fanin_speed.{json,md}
    python benchmarks/bench_fanin_speed.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    from sparseforge.masks import mask_from_scores
    from sparseforge.patterns import FanIn
    from sparseforge.runtime.advise import measure_layer
    from sparseforge.runtime.machine import machine_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--budget", type=float, default=1.0, help="seconds per candidate")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    shapes = [(512, 512)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    budget = 0.05 if args.quick else args.budget
    out = args.out or RESULTS / ("fanin_speed.quick.json" if args.quick else "fanin_speed.json")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        from sparseforge import kernels

        kernels.set_num_threads(threads)
        for shape in shapes:
            w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))  # (out, in)
            keep = mask_from_scores(w.abs(), FanIn(), args.sparsity)
            adv = measure_layer(w * keep, batch_sizes=(1,), formats=["fanin", "csr", "bitmap"], budget_s=budget,
                                stream=True)
            t = {f: v[1] for f, v in adv.timings.items()}
            rows.append({"threads": threads, "shape": list(shape), "sparsity": adv.sparsity, "ms": t,
                         "fanin_vs_dense": t["dense"] / t["fanin"], "fanin_vs_csr": t["csr"] / t["fanin"],
                         "fanin_vs_bitmap": t["bitmap"] / t["fanin"]})
    lines = [f"Constant fan-in at {args.sparsity:.0%}, batch 1, on {machine_info(args.threads[-1])['cpu']}; median ms per call "
             "(weights streamed from memory)", "",
             "| threads | shape (out x in) | dense | fan-in | CSR | bitmap | fan-in vs dense | vs CSR | vs bitmap |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["ms"]
        lines.append(f"| {r['threads']} | {r['shape'][0]}x{r['shape'][1]} | {t['dense']:.3f} | {t['fanin']:.3f} | {t['csr']:.3f} | "
                     f"{t['bitmap']:.3f} | {r['fanin_vs_dense']:.2f}x | {r['fanin_vs_csr']:.2f}x | {r['fanin_vs_bitmap']:.2f}x |")
    lines.append("\nSRigL paper: 3.6x vs dense and 2x vs unstructured sparse at 90% (their CPU, their kernels).")
    text = "\n".join(lines) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "sparsity": args.sparsity}, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
