"""Activation-sparsity quality: perplexity of the built-in model under TEAL (uniform, greedy), CATS, R-Sparse.

The built-in model (``sparseforge.io.builtin``, Llama-style, 6 blocks, hidden 256) is calibrated once
per allocation at the highest sparsity (TEAL's histograms; the greedy search records its path up to
that target), then retargeted to every sparsity in ``--sparsities`` from the same calibration
(:meth:`ActivationSparsityReport.retarget_`, TEAL's lookup). Perplexity is the project's protocol
(:func:`sparseforge.evaluation.quality.perplexity`, built-in held-out split) under two conventions:

* ``all``: every token's projection inputs are sparsified (what decoding sees);
* ``teal``: only the second half of each window (TEAL's and R-Sparse's published numbers).

Reported: perplexity per (allocation, sparsity, convention), the dense perplexity, and the
weighted (bytes) sparsity the thresholds reach. Greedy must not be worse than uniform. CATS
(``--methods cats``) thresholds the MLP gate only; R-Sparse (``rsparse``) is calibrated once per
sparsity (its ranks depend on it) and its weighted sparsity counts the low-rank term's bytes.

Usage:
    python benchmarks/bench_activation_quality.py            # 25/40/50 %, greedy on 2 sequences
    python benchmarks/bench_activation_quality.py --quick    # 25/50 %, fewer windows and steps
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_output import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", default="0.25,0.4,0.5")
    p.add_argument("--allocations", default="uniform,greedy", help="TEAL's allocations")
    p.add_argument("--methods", default="teal,rsparse", help="teal, cats, rsparse")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (histograms)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--greedy-samples", type=int, default=2, help="calibration sequences the greedy search runs on")
    p.add_argument("--windows", type=int, default=64, help="perplexity windows")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: small GEMMs, a shared machine)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.sparsities, args.samples, args.seqlen, args.windows = "0.25,0.5", 16, 128, 8
    args.sparsities = sorted(float(s) for s in args.sparsities.split(","))
    args.allocations = args.allocations.split(",")
    args.methods = args.methods.split(",")
    return args


def _variants(args) -> list[tuple[str, str]]:
    out = [("teal", a) for a in args.allocations if "teal" in args.methods]
    return out + [(m, "uniform") for m in ("cats", "rsparse") if m in args.methods]


def _rsparse_weighted(model) -> float:
    """Bytes skipped by R-Sparse layers at their calibrated channel sparsity, net of the low-rank term."""
    from sparseforge.activation import RSparseLinear

    skipped = total = 0.0
    for m in model.modules():
        if isinstance(m, RSparseLinear):
            size = m.in_features * m.out_features
            skipped += m.activation_info["calibrated_sparsity"] * size - m.rank * (m.in_features + m.out_features)
            total += size
    return skipped / total


def run(args) -> dict:
    from sparseforge.activation import ActivationSparsityConfig, set_token_fraction, sparsify_activations_
    from sparseforge.config import CalibrationConfig
    from sparseforge.evaluation.quality import perplexity
    from sparseforge.io.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model("builtin")
    base, tok = loaded.model, loaded.tokenizer

    def ppl(model) -> float:
        return perplexity(model, tok, max_windows=args.windows, progress=False).ppl

    dense = ppl(base)
    print(f"dense perplexity {dense:.3f}", flush=True)
    rows = []
    for method, allocation in _variants(args):
        calibrate_each = method == "rsparse"  # its ranks depend on the sparsity: no retargeting
        for target in args.sparsities if calibrate_each else [max(args.sparsities)]:
            model = copy.deepcopy(base)
            cfg = ActivationSparsityConfig(
                method=method, sparsity=target, allocation=allocation, greedy_samples=args.greedy_samples,
                calibration=CalibrationConfig(samples=args.samples, seqlen=args.seqlen, batch_size=args.greedy_samples))
            t0 = time.perf_counter()
            report = sparsify_activations_(model, cfg, tokenizer=tok, progress=False)
            seconds = time.perf_counter() - t0
            print(f"{method} {allocation}: calibrated in {seconds:.0f}s", flush=True)
            for s in [target] if calibrate_each else args.sparsities:
                if not calibrate_each:
                    report.retarget_(model, s)
                effective = _rsparse_weighted(model) if calibrate_each else report.effective_sparsity(model)
                row = {"method": method, "allocation": allocation, "sparsity": s, "effective": effective,
                       "calibration_s": seconds}
                for convention, fraction in (("all", 1.0), ("teal", 0.5)):
                    set_token_fraction(model, fraction)
                    row[f"ppl_{convention}"] = ppl(model)
                set_token_fraction(model, 1.0)
                rows.append(row)
                print(f"{method} {allocation} {s:.0%} (effective {row['effective']:.3f}): ppl all-tokens "
                      f"{row['ppl_all']:.3f}, TEAL convention {row['ppl_teal']:.3f}", flush=True)
    return {"meta": {"model": "builtin", "dense_ppl": dense, "windows": args.windows, "samples": args.samples,
                     "seqlen": args.seqlen, "greedy_samples": args.greedy_samples, "load_avg": os.getloadavg()},
            "rows": rows}


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"Built-in model, dense perplexity {m['dense_ppl']:.3f} ({m['windows']} windows); calibration "
             f"{m['samples']} x {m['seqlen']} tokens, greedy on {m['greedy_samples']} sequences", "",
             "| method | allocation | sparsity | weighted sparsity | ppl (all tokens) | ppl (TEAL: last half) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r.get('method', 'teal')} | {r['allocation']} | {r['sparsity']:.0%} | {r['effective']:.3f} | {r['ppl_all']:.3f} | {r['ppl_teal']:.3f} |")
    return "\n".join(lines)


def verdicts(result: dict) -> list[str]:
    by = {(r["allocation"], r["sparsity"]): r for r in result["rows"] if r.get("method", "teal") == "teal"}
    out = []
    for (alloc, s), r in sorted(by.items()):
        if alloc == "greedy" and ("uniform", s) in by:
            u = by[("uniform", s)]
            ok = r["ppl_all"] <= u["ppl_all"]
            out.append(f"{'PASS' if ok else 'FAIL'} greedy <= uniform at {s:.0%}: {r['ppl_all']:.3f} vs {u['ppl_all']:.3f}")
    return out


def save_and_print(result: dict, out: Path, table: str) -> None:
    """Write ``result`` to ``out`` (temp file, then rename), print ``table``, the verdicts and the path."""
    write_json(out, result, indent=1)
    print(table)
    print("\n".join(result["verdicts"]))
    print(f"# saved {out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    result["verdicts"] = verdicts(result)
    save_and_print(result, args.out or RESULTS / ("activation_quality.quick.json" if args.quick else "activation_quality.json"),
                   markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
