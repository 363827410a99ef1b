"""ReLU-fication of the built-in model: activation sparsity and perplexity before / after recovery.

The built-in model (Llama-style, SiLU-gated MLPs) gets a ReLU² gate (``relufy_``), then recovers with
``finetune_`` (cross-entropy + distillation from the original SiLU model, ``allow_dense=True``),
without and with ProSparse-style progressive L1 on the gate activations (``ActivationL1``), and
ProSparse itself (Song et al. 2024, arXiv:2402.13516): a ReLU gate, the L1 factor rising in
sine-shaped stages after a warm-up (``FinetuneConfig(l1_schedule=...)``), then activation threshold
shifting (``shift_activation_threshold_``: FATReLU gates). For each
variant: held-out perplexity (the project's protocol), the fraction of exact zeros at the gate (=
down_proj's skipped input channels, measured by ``SparseInputLinear.track_sparsity`` after
``relu_sparse_``), the perplexity of the lossless sparse model (must equal the dense one), and
batch-1 decode tokens/s of the sparse vs the dense ReLU² model (same run, 1 thread).

Usage:
    python benchmarks/bench_activation_relufy.py            # 200 fine-tuning steps per variant
    python benchmarks/bench_activation_relufy.py --quick    # 60 steps, fewer windows
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
from bench_activation_quality import RESULTS, save_and_print  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--activation", default="relu2", help="relu2 or relu")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per variant")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--l1", type=float, default=3.0, help="peak of the progressive L1 factor (one-stage variant)")
    p.add_argument("--prosparse-factors", type=float, nargs="+", default=[0.5, 1.5, 3.0],
                   help="ProSparse: the L1 factor of each stage after the warm-up (stages of equal length)")
    p.add_argument("--fatrelu", type=float, nargs="+", default=[0.01, 0.05],
                   help="ProSparse: FATReLU thresholds of the threshold-shifting rows")
    p.add_argument("--windows", type=int, default=32, help="perplexity windows")
    p.add_argument("--new-tokens", type=int, default=32, help="decode timing: tokens generated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.windows, args.new_tokens = 60, 8, 16
    return args


def _decode_tokens_per_s(model, ids, new_tokens: int) -> float:
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - t0)


def run(args) -> dict:
    from sparseforge.activation import ActivationL1, relu_sparse_, relufy_
    from sparseforge.activation.cats import CATSMLP
    from sparseforge.activation.l1_schedule import L1Schedule
    from sparseforge.activation.relufy import shift_activation_threshold_
    from sparseforge.evaluation.quality import perplexity
    from sparseforge.finetune import FinetuneConfig, finetune_
    from sparseforge.io.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model("builtin")
    original, tok = loaded.model.eval(), loaded.tokenizer
    prompt = tok("To be, or not to be", return_tensors="pt").input_ids

    def ppl(model) -> float:
        return perplexity(model, tok, max_windows=args.windows, progress=False).ppl

    def measure(name: str, model, seconds: float = 0.0) -> dict:
        row = {"variant": name, "ppl": ppl(model.eval()), "finetune_s": seconds}
        dense_tps = _decode_tokens_per_s(model, prompt, args.new_tokens)
        sparse = copy.deepcopy(model)
        relu_sparse_(sparse)
        downs = [m.down_proj for m in sparse.modules() if isinstance(m, CATSMLP)]
        for d in downs:
            d.track_sparsity = True
        row["ppl_sparse"] = ppl(sparse)
        row["sparsity"] = sum(d.skipped for d in downs) / sum(d.seen for d in downs)
        for d in downs:
            d.track_sparsity = False
        row["decode_dense_tps"], row["decode_sparse_tps"] = dense_tps, _decode_tokens_per_s(sparse, prompt, args.new_tokens)
        print(f"{name}: ppl {row['ppl']:.3f} (sparse {row['ppl_sparse']:.3f}), gate zeros {row['sparsity']:.1%}, "
              f"decode {row['decode_dense_tps']:.1f} -> {row['decode_sparse_tps']:.1f} tok/s", flush=True)
        return row

    rows = [{"variant": "original (SiLU)", "ppl": ppl(original), "sparsity": 0.0}]
    print(f"original: ppl {rows[0]['ppl']:.3f}", flush=True)
    swapped = copy.deepcopy(original)
    relufy_(swapped, args.activation)
    rows.append(measure(f"{args.activation}, no training", swapped))
    for label, peak in (("fine-tuned", 0.0), (f"fine-tuned + progressive L1 (peak {args.l1:g})", args.l1)):
        student = copy.deepcopy(original)
        relufy_(student, args.activation)
        l1 = ActivationL1(student, peak=peak, warmup=max(1, args.steps // 2)) if peak else None
        cfg = FinetuneConfig(loss="ce+kd", steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 10),
                             batch_size=args.batch_size, seqlen=args.seqlen, allow_dense=True)
        t0 = time.perf_counter()
        finetune_(student, cfg, teacher=original, tokenizer=tok, kind="causal-lm", evaluate=False, progress=False,
                  callback=l1.callback if l1 else None)
        seconds = time.perf_counter() - t0
        if l1:
            l1.remove()
        rows.append(measure(f"{args.activation}, {label}", student, seconds))
    schedule = L1Schedule.even(args.prosparse_factors, steps=args.steps, warmup=max(1, args.steps // 10))
    student = copy.deepcopy(original)
    relufy_(student, "relu")
    cfg = FinetuneConfig(loss="ce+kd", steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 10),
                         batch_size=args.batch_size, seqlen=args.seqlen, allow_dense=True, l1_schedule=schedule)
    t0 = time.perf_counter()
    finetune_(student, cfg, teacher=original, tokenizer=tok, kind="causal-lm", evaluate=False, progress=False)
    seconds = time.perf_counter() - t0
    stages = "/".join(f"{f:g}" for f in args.prosparse_factors)
    rows.append(measure(f"relu, ProSparse L1 stages {stages}", student, seconds))
    for t in args.fatrelu:
        shifted = copy.deepcopy(student)
        shift_activation_threshold_(shifted, t)
        rows.append(measure(f"relu, ProSparse L1 stages {stages} + FATReLU {t:g}", shifted, seconds))
    return {"meta": {"model": "builtin", "activation": args.activation, "steps": args.steps, "lr": args.lr,
                     "batch_size": args.batch_size, "seqlen": args.seqlen, "l1_peak": args.l1, "windows": args.windows,
                     "prosparse_schedule": schedule.to_list(), "fatrelu": args.fatrelu,
                     "threads": args.threads, "load_avg": os.getloadavg()}, "rows": rows}


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"Built-in model, {m['activation']} gate, {m['steps']} fine-tuning steps (ce + kd, batch {m['batch_size']} x "
             f"{m['seqlen']}, lr {m['lr']:g}); perplexity on {m['windows']} held-out windows; decode at batch 1, "
             f"{m['threads']} thread(s)"
             + (f"; ProSparse rows: ReLU gate, L1 schedule {m['prosparse_schedule']} ([factor, end step]: warm-up, then "
                "a sine rise per stage), then FATReLU at the given threshold" if "prosparse_schedule" in m else ""), "",
             "| variant | ppl | gate zeros (skipped) | ppl, sparse | decode tok/s dense -> sparse |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        sparse = f"{r['ppl_sparse']:.3f}" if "ppl_sparse" in r else "-"
        speed = f"{r['decode_dense_tps']:.1f} -> {r['decode_sparse_tps']:.1f}" if "decode_dense_tps" in r else "-"
        lines.append(f"| {r['variant']} | {r['ppl']:.3f} | {r['sparsity']:.1%} | {sparse} | {speed} |")
    return "\n".join(lines)


def verdicts(result: dict) -> list[str]:
    out = []
    for r in result["rows"]:
        if "ppl_sparse" in r:
            ok = abs(r["ppl_sparse"] - r["ppl"]) <= 1e-4 * r["ppl"]
            out.append(f"{'PASS' if ok else 'FAIL'} lossless skipping ({r['variant']}): {r['ppl_sparse']:.4f} vs {r['ppl']:.4f}")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    result["verdicts"] = verdicts(result)
    save_and_print(result, args.out or RESULTS / ("activation_relufy.quick.json" if args.quick else "activation_relufy.json"),
                   markdown(result))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
