#!/usr/bin/env python
"""Recovery fine-tuning benchmark: CE vs KD vs SquareHead after SparseGPT, and DSnoT vs Wanda.

Built-in model (:func:`sparseforge.io.models.load_model` ``"builtin"``): SparseGPT at 70 % unstructured
and at 2:4 (one pruned model per pattern, the same calibration windows), then recovery with each
loss at equal steps and tokens (the same batches for every loss of a seed), for several seeds.
Reported: held-out perplexity of the dense, pruned and recovered models, and the gap recovered
``(ppl_pruned - ppl_recovered) / (ppl_pruned - ppl_dense)`` in percent (median and range over seeds).

``--minilm``: MiniLM (all-MiniLM-L6-v2) pruned 50 % with SparseGPT, distilled with SquareHead on
sentences of the built-in train split; mean embedding cosine to the dense encoder on held-out
sentences never used for training, before and after.

``--dsnot``: held-out perplexity of Wanda alone vs DSnoT on the Wanda mask at 60 % and 70 %.

``--cost``: fine-tuning cost of each method of ``--cost-methods`` (:data:`COST_METHODS`: full
fine-tuning, S²FT, ...) on the dense built-in model with cross-entropy at equal steps and batches:
median step time, peak RSS and its growth over the loaded model, trainable parameters, and the
perplexity reached on the last 20 % of the held-out works (Shakespeare works the model never saw,
fine-tuned on their first 80 %). Every run is a fresh process (peak RSS is per process), the methods
interleaved ``--cost-repeats`` times.

Writes ``OUT/finetune.json`` and ``OUT/finetune.md`` (``finetune.quick.*`` with ``--quick``) and prints
the tables. Every figure is from this run on this machine; the CPU is named in the output.

Usage::

    python benchmarks/bench_finetune.py --quick            # a few minutes on 2 shared cores
    python benchmarks/bench_finetune.py --minilm --dsnot   # full: 3 seeds x 200 steps (hours on 2 cores)
    python benchmarks/bench_finetune.py --quick --cost --patterns '' # only the cost comparison
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = dict(steps=200, seeds=3, eval_windows=32, samples=64, batch_size=4, seqlen=128, minilm_steps=300, eval_sentences=256)
QUICK = dict(steps=20, seeds=1, eval_windows=8, samples=16, batch_size=4, seqlen=128, minilm_steps=20, eval_sentences=64)
LOSSES = ("ce", "kd", "squarehead", "ce+squarehead")
PATTERNS = {"70%": ("unstructured", 0.7), "2:4": ("2:4", None)}
#: --cost: FinetuneConfig options of each method (loss ce, the dense built-in model); the lr of each is the best
#: of {1e-4, 3e-4} (full) and {1e-3, 3e-3, 1e-2} (s2ft) on the quick setting
COST_METHODS = {
    "full": dict(lr=1e-4),
    "s2ft": dict(lr=1e-2, adapter="s2ft", s2ft={"budget": 0.01, "parts": "o,down", "select": "random"}),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke subset: " + json.dumps(QUICK).replace("%", "%%"))
    ap.add_argument("--steps", type=int, help="optimizer steps per recovery run")
    ap.add_argument("--seeds", type=int, help="seeds per (pattern, loss)")
    ap.add_argument("--eval-windows", type=int, help="held-out perplexity windows of seqlen tokens")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--minilm", action="store_true", help="also the MiniLM SquareHead distillation")
    ap.add_argument("--dsnot", action="store_true", help="also DSnoT vs Wanda at 60%% and 70%%")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--minilm-steps", type=int, help="SquareHead steps of the MiniLM run")
    ap.add_argument("--cost", action="store_true", help="also the fine-tuning cost comparison (step time, peak RSS, quality)")
    ap.add_argument("--cost-methods", default=",".join(COST_METHODS), help="methods of --cost, from " + ",".join(COST_METHODS))
    ap.add_argument("--cost-repeats", type=int, default=None, help="interleaved runs per method (default 2 quick, 3 full)")
    ap.add_argument("--cost-worker", default=None, help=argparse.SUPPRESS)  # one measured run, in a child process
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default=None, help="file stem of the results (default finetune / finetune.quick)")
    return ap


def _ppl(model, tokenizer, heldout, windows, seqlen) -> float:
    from sparseforge.evaluation.quality import perplexity

    return perplexity(model, tokenizer, token_ids=heldout, seqlen=seqlen, max_windows=windows, progress=False).ppl


def _prune(model, tokenizer, method, pattern, sparsity, samples, seqlen, options=None):
    import sparseforge as sf

    cfg = sf.SparsifyConfig(method=method, pattern=pattern, sparsity=sparsity, method_options=options or {},
                            calibration=sf.CalibrationConfig(samples=samples, seqlen=seqlen, seed=0))
    sf.sparsify_(model, cfg, tokenizer=tokenizer, progress=False)
    return model


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def recovery(cfg: dict, args, log) -> dict:
    from sparseforge.data import calibration as data
    from sparseforge.finetune import FinetuneConfig, finetune_
    from sparseforge.io.models import load_model

    dense = load_model("builtin")
    tok = dense.tokenizer
    heldout = data.corpus_token_ids(tok, "heldout")
    ppl_dense = _ppl(dense.model, tok, heldout, cfg["eval_windows"], cfg["seqlen"])
    log(f"dense held-out ppl {ppl_dense:.3f}")
    rows = []
    for label in args.patterns.split(","):
        pattern, sparsity = PATTERNS[label]
        t0 = time.perf_counter()
        pruned = _prune(copy.deepcopy(dense.model), tok, "sparsegpt", pattern, sparsity, cfg["samples"], cfg["seqlen"])
        ppl_pruned = _ppl(pruned, tok, heldout, cfg["eval_windows"], cfg["seqlen"])
        log(f"{label}: SparseGPT ppl {ppl_pruned:.3f} ({time.perf_counter() - t0:.0f} s)")
        for loss in args.losses.split(","):
            ppls, gaps, secs = [], [], []
            for seed in range(cfg["seeds"]):
                student = copy.deepcopy(pruned)
                fc = FinetuneConfig(loss=loss, steps=cfg["steps"], lr=args.lr, batch_size=cfg["batch_size"],
                                    seqlen=cfg["seqlen"], seed=seed, warmup_steps=max(1, cfg["steps"] // 10))
                t0 = time.perf_counter()
                finetune_(student, fc, teacher=dense.model, tokenizer=tok, kind="causal-lm", evaluate=False, progress=False)
                secs.append(time.perf_counter() - t0)
                ppl = _ppl(student, tok, heldout, cfg["eval_windows"], cfg["seqlen"])
                ppls.append(ppl)
                gaps.append(100.0 * (ppl_pruned - ppl) / (ppl_pruned - ppl_dense))
                log(f"{label} {loss} seed {seed}: ppl {ppl:.3f}, gap recovered {gaps[-1]:.1f}% ({secs[-1]:.0f} s)")
            rows.append({"pattern": label, "loss": loss, "ppl_dense": ppl_dense, "ppl_pruned": ppl_pruned,
                         "ppl": _spread(ppls), "gap_recovered_pct": _spread(gaps), "seconds_per_run": statistics.median(secs)})
    return {"rows": rows, "ppl_dense": ppl_dense}


def minilm(cfg: dict, args, log) -> dict:
    from sparseforge.data import corpus
    from sparseforge.evaluation.quality import embedding_fidelity
    from sparseforge.finetune import FinetuneConfig, finetune_
    from sparseforge.io.models import load_model

    dense = load_model("minilm")
    student = copy.deepcopy(dense.model)
    _prune(student, dense.tokenizer, "sparsegpt", "unstructured", 0.5, cfg["samples"], 128)
    sentences = corpus.heldout_sentences(cfg["eval_sentences"])
    before = embedding_fidelity(dense.model, student, dense.tokenizer, sentences).mean_cosine
    fc = FinetuneConfig(loss="squarehead", steps=cfg["minilm_steps"], lr=args.lr, batch_size=16, seqlen=128,
                        warmup_steps=max(1, cfg["minilm_steps"] // 10))
    t0 = time.perf_counter()
    finetune_(student, fc, teacher=dense.model, tokenizer=dense.tokenizer, kind="encoder", evaluate=False, progress=False)
    secs = time.perf_counter() - t0
    after = embedding_fidelity(dense.model, student, dense.tokenizer, sentences).mean_cosine
    log(f"minilm 50% SparseGPT: cosine {before:.4f} -> {after:.4f} after {cfg['minilm_steps']} SquareHead steps ({secs:.0f} s)")
    return {"cosine_pruned": before, "cosine_recovered": after, "steps": cfg["minilm_steps"], "seconds": secs,
            "sentences": len(sentences)}


def dsnot(cfg: dict, args, log) -> dict:
    from sparseforge.data import calibration as data
    from sparseforge.io.models import load_model

    dense = load_model("builtin")
    tok = dense.tokenizer
    heldout = data.corpus_token_ids(tok, "heldout")
    width = dense.model.config.hidden_size
    scaled = max(1, round(50 * width / 4096))  # the reference's 50 cycles were set for rows of 4096 weights
    variants = {"wanda": ("wanda", None), "dsnot": ("dsnot", None), "dsnot_scaled": ("dsnot", {"max_cycles": scaled})}
    rows = []
    for sparsity in (0.6, 0.7):
        ppls = {}
        for key, (method, options) in variants.items():
            model = _prune(copy.deepcopy(dense.model), tok, method, "unstructured", sparsity, cfg["samples"], cfg["seqlen"],
                           options)
            ppls[key] = _ppl(model, tok, heldout, cfg["eval_windows"], cfg["seqlen"])
        log(f"{sparsity:.0%}: " + ", ".join(f"{k} ppl {v:.3f}" for k, v in ppls.items()))
        rows.append({"sparsity": sparsity, **ppls})
    return {"rows": rows, "scaled_cycles": scaled}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cost_tokens(tok):
    """(train, eval) token ids: the held-out works (never trained on), first 80 % / last 20 %."""
    from sparseforge.data import calibration as data

    ids = data.corpus_token_ids(tok, "heldout")
    cut = int(0.8 * ids.numel())
    return ids[:cut], ids[cut:]


def cost_worker(method: str, cfg: dict, args) -> dict:
    """One fine-tuning run of ``method`` in this (fresh) process: step times, peak RSS, trainable parameters, quality."""
    from sparseforge.finetune import FinetuneConfig, finetune_
    from sparseforge.io.models import load_model

    model = load_model("builtin")
    train, heldout = _cost_tokens(model.tokenizer)
    ppl_before = _ppl(model.model, model.tokenizer, heldout, cfg["eval_windows"], cfg["seqlen"])
    rss_loaded = _rss_mb()
    fc = FinetuneConfig(loss="ce", steps=cfg["steps"], batch_size=cfg["batch_size"], seqlen=cfg["seqlen"], seed=0,
                        warmup_steps=max(1, cfg["steps"] // 10), allow_dense=True, **COST_METHODS[method])
    stamps = [(time.perf_counter(), time.process_time())]  # wall, and CPU time of this process (less contention-bound)
    result = finetune_(model.model, fc, tokenizer=model.tokenizer, kind="causal-lm", data=train, evaluate=False,
                       progress=False, callback=lambda info: stamps.append((time.perf_counter(), time.process_time())))
    peak = _peak_rss_mb()
    steps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][1:]  # the first step warms up
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][1:]
    ppl = _ppl(model.model, model.tokenizer, heldout, cfg["eval_windows"], cfg["seqlen"])
    return {"method": method, "step_s": statistics.median(steps), "step_cpu_s": statistics.median(cpu), "peak_rss_mb": peak,
            "train_rss_mb": peak - rss_loaded, "trainable": result.trainable,
            "params": sum(p.numel() for p in model.model.parameters()), "ppl_before": ppl_before, "ppl": ppl,
            "lr": fc.lr}


def cost(cfg: dict, args, log) -> dict:
    """Every method of ``--cost-methods`` in fresh child processes, interleaved; medians per method."""
    import subprocess

    methods = args.cost_methods.split(",")
    unknown = [m for m in methods if m not in COST_METHODS]
    if unknown:
        raise SystemExit(f"unknown --cost-methods {unknown}; choose from {', '.join(COST_METHODS)}")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(cfg["cost_repeats"]):
        for method in methods:
            argv = [sys.executable, __file__, "--cost-worker", method, "--threads", str(args.threads),
                    "--steps", str(cfg["steps"]), "--eval-windows", str(cfg["eval_windows"])]
            done = subprocess.run(argv + (["--quick"] if args.quick else []), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"cost run {method} failed:\n{done.stderr[-2000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs[method].append(run)
            log(f"cost {method} run {rep + 1}: {run['step_s'] * 1e3:.0f} ms/step ({run['step_cpu_s'] * 1e3:.0f} ms CPU), peak RSS {run['peak_rss_mb']:.0f} MB "
                f"(+{run['train_rss_mb']:.0f} MB training), {run['trainable']} trainable, ppl {run['ppl_before']:.2f} -> {run['ppl']:.2f}")
    rows = []
    for method, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("step_s", "step_cpu_s", "peak_rss_mb", "train_rss_mb", "ppl")}
        rows.append({"method": method, **med, "trainable": rs[0]["trainable"], "params": rs[0]["params"],
                     "ppl_before": rs[0]["ppl_before"], "lr": rs[0]["lr"], "runs": rs})
    base = next((r for r in rows if r["method"] == "full"), rows[0])
    for r in rows:
        r["step_vs_full"] = r["step_s"] / base["step_s"]
        r["cpu_vs_full"] = r["step_cpu_s"] / base["step_cpu_s"]
        r["train_rss_vs_full"] = r["train_rss_mb"] / base["train_rss_mb"] if base["train_rss_mb"] > 0 else float("nan")
    return {"rows": rows, "repeats": cfg["cost_repeats"], "steps": cfg["steps"]}


def markdown(result: dict) -> str:
    out = [f"CPU: {result['cpu']}; torch threads {result['threads']}; {result['settings']}", ""]
    if "recovery" in result:
        out += ["| pattern | loss | dense ppl | SparseGPT ppl | recovered ppl (median [min, max]) | gap recovered % (median [min, max]) | s / run |",
                "|---|---|---|---|---|---|---|"]
        for r in result["recovery"]["rows"]:
            p, g = r["ppl"], r["gap_recovered_pct"]
            out.append(f"| {r['pattern']} | {r['loss']} | {r['ppl_dense']:.3f} | {r['ppl_pruned']:.3f} | "
                       f"{p['median']:.3f} [{p['min']:.3f}, {p['max']:.3f}] | {g['median']:.1f} [{g['min']:.1f}, {g['max']:.1f}] | "
                       f"{r['seconds_per_run']:.0f} |")
    if "minilm" in result:
        m = result["minilm"]
        out += ["", "| MiniLM 50% SparseGPT | mean cosine to dense |", "|---|---|",
                f"| pruned | {m['cosine_pruned']:.4f} |", f"| + SquareHead, {m['steps']} steps | {m['cosine_recovered']:.4f} |"]
    if "dsnot" in result:
        c = result["dsnot"]["scaled_cycles"]
        out += ["", f"| sparsity | Wanda ppl | DSnoT on Wanda, reference defaults (50 cycles) | DSnoT, {c} cycles (50 x width / 4096) |",
                "|---|---|---|---|"]
        out += [f"| {r['sparsity']:.0%} | {r['wanda']:.3f} | {r['dsnot']:.3f} | {r['dsnot_scaled']:.3f} |"
                for r in result["dsnot"]["rows"]]
    if "cost" in result:
        c = result["cost"]
        out += ["", f"Fine-tuning cost, dense built-in model, CE, {c['steps']} steps, medians of {c['repeats']} interleaved "
                "runs (each a fresh process); quality: perplexity on the last 20% of the held-out works after training "
                "on their first 80%", "",
                "| method | lr | trainable params | step ms (wall) | x full | step ms (CPU time) | x full | peak RSS MB | "
                "training RSS MB | x full | ppl before -> after |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['method']} | {r['lr']:g} | {r['trainable']} ({100 * r['trainable'] / r['params']:.2f}%) | "
                f"{r['step_s'] * 1e3:.0f} | {r['step_vs_full']:.2f} | {r['step_cpu_s'] * 1e3:.0f} | {r['cpu_vs_full']:.2f} | "
                f"{r['peak_rss_mb']:.0f} | {r['train_rss_mb']:.0f} | "
                f"{r['train_rss_vs_full']:.2f} | {r['ppl_before']:.2f} -> {r['ppl']:.2f} |" for r in c["rows"]]
    return "\n".join(out) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("steps", "seeds", "eval_windows", "minilm_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["cost_repeats"] = args.cost_repeats or (2 if args.quick else 3)
    if args.cost_worker:
        print(json.dumps(cost_worker(args.cost_worker, cfg, args)))
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    result = {"cpu": cpu_name(), "threads": args.threads, "lr": args.lr,
              "settings": ", ".join(f"{k}={v}" for k, v in cfg.items()) + f", lr={args.lr:g}", "config": cfg}
    stem = args.name or ("finetune.quick" if args.quick else "finetune")
    if args.patterns and args.losses:
        result["recovery"] = recovery(cfg, args, log)
    if args.minilm:
        result["minilm"] = minilm(cfg, args, log)
    if args.dsnot:
        result["dsnot"] = dsnot(cfg, args, log)
    if args.cost:
        result["cost"] = cost(cfg, args, log)
    table = markdown(result)
    _write(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    _write(args.out / f"{stem}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
