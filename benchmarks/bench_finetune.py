#!/usr/bin/env python
"""Recovery fine-tuning benchmark: CE vs KD vs SquareHead after SparseGPT, and DSnoT vs Wanda.

Built-in model (:func:`sparseforge.io.models.load_model` ``"builtin"``): SparseGPT at 70 % unstructured
and at 2:4 (one pruned model per pattern, the same calibration windows), then recovery with each
loss at equal steps and tokens (the same batches for every loss of a seed), for several seeds.
Reported: held-out perplexity of the dense, pruned and recovered models, and the gap recovered
``(ppl_pruned - ppl_recovered) / (ppl_pruned - ppl_dense)`` in percent (median and range over seeds).

``--minilm``: MiniLM (all-MiniLM-L6-v2) pruned 50 % with SparseGPT, distilled with SquareHead on
sentences of the built-in train split; mean embedding cosine to the dense encoder on held-out
sentences never used for training, before and after (and at the ``--minilm-curve`` steps), on the
reported sentences and on as many validation sentences (the next ones of the same shuffle, disjoint).

Tuning: ``--eval-split validation`` scores the first windows of *The Tempest* + *Twelfth Night*
(:data:`VALIDATION_WORKS`) instead of the reported first windows of *Hamlet*, so recipes (lr, steps,
loss mix; ``--lr ce=1e-4,squarehead=1e-3`` sets one per loss) are chosen on text the reported figures
never score.

``--dsnot``: held-out perplexity of Wanda alone vs DSnoT on the Wanda mask at 60 % and 70 %.

``--cost``: fine-tuning cost of the built-in model pruned 70 % with SparseGPT: full fine-tuning
(every weight, mask kept), LoRA (``peft``), SparseLoRA and S²FT (:data:`COST_METHODS`) at equal steps
and batches, each run in a fresh process, the methods interleaved within each seed. Reported:
median step time (CPU time of the training thread, and wall clock) and the CPU ratio to LoRA's,
and held-out perplexity on the last 20 % of ``--cost-data`` after training on the first 80 % (default:
the built-in corpus' held-out works, never seen by the built-in model's training), from a run with
the default allocator; the peak RSS of the training (``VmHWM`` reset once the model is loaded) and
its growth from a second, :data:`MEMORY_STEPS`-step run of the same method with
``MALLOC_MMAP_THRESHOLD_`` 64 KiB, so freed blocks leave the RSS (that setting makes every large
allocation a fresh mmap and page faults: it slowed a built-in LoRA step by ~60 %, so it never
runs in the timed process). Then one LoRA MLP block's forward + backward, LoRA vs SparseLoRA (sparsity 0.9 and the
Llama-3 configs' 0.99), and one whole LoRA decoder layer (attention + MLP), LoRA vs SparseLoRA on
the MLP alone vs on the MLP and attention (0.9 / 0.6), at the built-in width and at 1024 x 2816,
alternating call by call.
``--losses ''`` leaves the recovery table out.

Writes ``OUT/finetune.json`` and ``OUT/finetune.md`` (``finetune.quick.*`` with ``--quick``) and prints
the tables. Every figure is from this run on this machine; the CPU is named in the output.

Usage::

    python benchmarks/bench_finetune.py --quick            # a few minutes on 2 shared cores
    python benchmarks/bench_finetune.py --minilm --dsnot   # full: 3 seeds x 100 steps (hours on 2 shared cores)
    python benchmarks/bench_finetune.py --eval-split validation --seeds 1 --lr 3e-4   # tune on the validation works
    python benchmarks/bench_finetune.py --quick --cost --losses ''   # the cost table only
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

FULL = dict(steps=100, seeds=3, eval_windows=64, samples=64, batch_size=8, seqlen=128, minilm_steps=300, eval_sentences=256)
QUICK = dict(steps=20, seeds=1, eval_windows=8, samples=16, batch_size=4, seqlen=128, minilm_steps=20, eval_sentences=64)
LOSSES = ("ce", "kd", "squarehead", "kd+squarehead", "ce+squarehead")
#: learning rate of each recovery loss: SquareHead's tuned on the validation split (1e-3 beat 3e-4 and 2e-3; batch 8
#: beat 4; benchmarks/results/finetune.tuning.md); the other losses run at the same lr and batch (equal recipe)
RECOVERY_LR = {"ce": 1e-3, "kd": 1e-3, "squarehead": 1e-3, "kd+squarehead": 1e-3, "ce+squarehead": 1e-3}
MINILM_LR = 5e-4
#: held-out works scored by ``--eval-split validation`` (tuning); the reported windows are the first of Hamlet
VALIDATION_WORKS = ("tempest", "twelfth_night")
PATTERNS = {"70%": ("unstructured", 0.7), "2:4": ("2:4", None)}
#: --cost: steps of the separate peak-memory run of each method (the peak is reached in every step)
MEMORY_STEPS = 4
#: --cost: the allocator setting of the peak-memory run only (see the module doc)
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
#: --cost: FinetuneConfig options of each method (loss ce, the built-in model pruned 70 % by SparseGPT); lr per method
COST_METHODS = {
    "full": dict(lr=1e-4),
    "lora": dict(lr=2e-3, adapter="lora"),
    "sparselora": dict(lr=2e-3, adapter="sparselora"),  # the defaults: MLP 0.9, attention dense
    "sparselora-attn": dict(lr=2e-3, adapter="sparselora", sparselora_attn_sparsity=0.6),  # + attention 0.6
    # the reference's Llama-3-8B configurations (configs/sparsity/llama3-8b-*.yaml): MLP 0.99, attention 0.75
    "sparselora-llama3": dict(lr=2e-3, adapter="sparselora", sparselora_sparsity=0.99, sparselora_attn_sparsity=0.75),
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
    ap.add_argument("--seed-start", type=int, default=0, help="first seed (seeds are independent: split a run across processes)")
    ap.add_argument("--eval-windows", type=int, help="held-out perplexity windows of seqlen tokens")
    ap.add_argument("--batch-size", type=int, help="sequences per recovery step (every loss the same)")
    ap.add_argument("--warmup", type=float, default=0.1, help="warm-up as a fraction of the steps (default 0.1)")
    ap.add_argument("--grad-clip", type=float, default=1.0,
                    help="max gradient norm of every recovery run (default 1.0, FinetuneConfig's); 0: no clipping, as the "
                         "SquareHead reference recipe (it cannot clip: pruned weights would distort the norm)")
    ap.add_argument("--lr", default=None,
                    help="learning rate of every loss ('3e-4') or per loss ('ce=1e-4,squarehead=1e-3'); default RECOVERY_LR")
    ap.add_argument("--eval-split", choices=("heldout", "validation"), default="heldout",
                    help="'heldout': the reported windows / sentences; 'validation': disjoint ones for tuning (see module doc)")
    ap.add_argument("--minilm-lr", type=float, default=None, help="learning rate of the MiniLM run (default MINILM_LR)")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--minilm", action="store_true", help="also the MiniLM SquareHead distillation")
    ap.add_argument("--dsnot", action="store_true", help="also DSnoT vs Wanda at 60%% and 70%%")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--minilm-steps", type=int, help="SquareHead steps of the MiniLM run")
    ap.add_argument("--minilm-curve", default="", help="steps at which to also report the MiniLM cosine, e.g. '100,200'")
    ap.add_argument("--cost", action="store_true", help="also the cost table: full fine-tuning vs LoRA vs SparseLoRA")
    ap.add_argument("--cost-data", default="heldout", help="'heldout' (the built-in held-out works) or a .txt file")
    ap.add_argument("--cost-methods", default=",".join(COST_METHODS), help="methods of --cost, from " + ",".join(COST_METHODS))
    ap.add_argument("--cost-worker", type=Path, default=None, help=argparse.SUPPRESS)  # one run of the cost table
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


def loss_lrs(spec: "str | None", losses: list[str]) -> dict[str, float]:
    """``{loss: lr}`` from ``--lr``: one number for every loss, or ``loss=lr`` pairs (the rest: :data:`RECOVERY_LR`)."""
    if spec is None:
        return {loss: RECOVERY_LR[loss] for loss in losses}
    if "=" not in spec:
        return {loss: float(spec) for loss in losses}
    given = dict(part.split("=", 1) for part in spec.split(","))
    return {loss: float(given[loss]) if loss in given else RECOVERY_LR[loss] for loss in losses}


def eval_tokens(tok, split: str):
    """Token ids whose first windows are scored: the held-out split (Hamlet first) or the validation works."""
    from sparseforge.data import calibration as data
    from sparseforge.data import corpus

    if split == "heldout":
        return data.corpus_token_ids(tok, "heldout")
    return data.encode(tok, corpus.DOC_SEPARATOR.join(corpus.load_work(w) for w in VALIDATION_WORKS))


def eval_sentences(n: int, split: str) -> list[str]:
    """The reported held-out sentences, or ``n`` others from the same shuffle (disjoint) for tuning."""
    from sparseforge.data import corpus

    return corpus.heldout_sentences(n) if split == "heldout" else corpus.heldout_sentences(2 * n)[n:]


def recovery_config(cfg: dict, args, loss: str, lr: float, seed: int):
    """The :class:`~sparseforge.finetune.FinetuneConfig` of one recovery run: the same steps, batches, warm-up
    and clipping for every loss (``--grad-clip 0``: none)."""
    from sparseforge.finetune import FinetuneConfig

    return FinetuneConfig(loss=loss, steps=cfg["steps"], lr=lr, batch_size=cfg["batch_size"], seqlen=cfg["seqlen"],
                          seed=seed, warmup_steps=max(1, round(args.warmup * cfg["steps"])),
                          grad_clip=args.grad_clip or None)


def recovery(cfg: dict, args, log) -> dict:
    from sparseforge.finetune import finetune_
    from sparseforge.io.models import load_model

    dense = load_model("builtin")
    tok = dense.tokenizer
    heldout = eval_tokens(tok, args.eval_split)
    losses = args.losses.split(",")
    lrs = loss_lrs(args.lr, losses)
    ppl_dense = _ppl(dense.model, tok, heldout, cfg["eval_windows"], cfg["seqlen"])
    log(f"dense {args.eval_split} ppl {ppl_dense:.3f}")
    rows = []
    for label in args.patterns.split(","):
        pattern, sparsity = PATTERNS[label]
        t0 = time.perf_counter()
        pruned = _prune(copy.deepcopy(dense.model), tok, "sparsegpt", pattern, sparsity, cfg["samples"], cfg["seqlen"])
        ppl_pruned = _ppl(pruned, tok, heldout, cfg["eval_windows"], cfg["seqlen"])
        log(f"{label}: SparseGPT ppl {ppl_pruned:.3f} ({time.perf_counter() - t0:.0f} s)")
        for loss in losses:
            ppls, gaps, secs = [], [], []
            for seed in range(args.seed_start, args.seed_start + cfg["seeds"]):
                student = copy.deepcopy(pruned)
                fc = recovery_config(cfg, args, loss, lrs[loss], seed)
                t0 = time.perf_counter()
                finetune_(student, fc, teacher=dense.model, tokenizer=tok, kind="causal-lm", evaluate=False, progress=False)
                secs.append(time.perf_counter() - t0)
                ppl = _ppl(student, tok, heldout, cfg["eval_windows"], cfg["seqlen"])
                ppls.append(ppl)
                gaps.append(100.0 * (ppl_pruned - ppl) / (ppl_pruned - ppl_dense))
                log(f"{label} {loss} lr {lrs[loss]:g} seed {seed}: ppl {ppl:.3f}, gap recovered {gaps[-1]:.1f}% ({secs[-1]:.0f} s)")
            rows.append({"pattern": label, "loss": loss, "lr": lrs[loss], "ppl_dense": ppl_dense, "ppl_pruned": ppl_pruned,
                         "ppl": _spread(ppls), "gap_recovered_pct": _spread(gaps), "seconds_per_run": statistics.median(secs)})
    return {"rows": rows, "ppl_dense": ppl_dense, "eval_split": args.eval_split}


def minilm(cfg: dict, args, log) -> dict:
    """MiniLM 50 % SparseGPT + SquareHead; mean cosine on the validation and the held-out sentences (disjoint)."""
    from sparseforge.evaluation.quality import embedding_fidelity
    from sparseforge.finetune import FinetuneConfig, finetune_
    from sparseforge.io.models import load_model

    dense = load_model("minilm")
    student = copy.deepcopy(dense.model)
    _prune(student, dense.tokenizer, "sparsegpt", "unstructured", 0.5, cfg["samples"], 128)
    sets = {split: eval_sentences(cfg["eval_sentences"], split) for split in ("validation", "heldout")}

    def cosines() -> dict[str, float]:
        return {split: embedding_fidelity(dense.model, student, dense.tokenizer, s).mean_cosine for split, s in sets.items()}

    before = cosines()
    lr = args.minilm_lr if args.minilm_lr is not None else MINILM_LR
    curve = []
    checkpoints = {int(c) for c in args.minilm_curve.split(",") if c}

    def probe(info) -> None:  # cosines part-way through the schedule
        if info.step in checkpoints and info.step < cfg["minilm_steps"]:
            student.eval()
            curve.append({"step": info.step, **cosines()})
            student.train()
            log(f"minilm step {info.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in curve[-1].items() if k != "step"))

    fc = FinetuneConfig(loss="squarehead", steps=cfg["minilm_steps"], lr=lr, batch_size=16, seqlen=128,
                        warmup_steps=max(1, cfg["minilm_steps"] // 10))
    t0 = time.perf_counter()
    finetune_(student, fc, teacher=dense.model, tokenizer=dense.tokenizer, kind="encoder", evaluate=False, progress=False,
              callback=probe)
    secs = time.perf_counter() - t0
    after = cosines()
    log(f"minilm 50% SparseGPT, {cfg['minilm_steps']} SquareHead steps, lr {lr:g} ({secs:.0f} s): "
        + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in sets))
    return {"cosine_pruned": before["heldout"], "cosine_recovered": after["heldout"], "validation_pruned": before["validation"],
            "validation_recovered": after["validation"], "steps": cfg["minilm_steps"], "lr": lr, "seconds": secs,
            "sentences": len(sets["heldout"]), "curve": curve}


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


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def cost_worker(args) -> int:
    """One (method, seed) run of the cost table in this fresh process; prints one JSON line.

    Peak memory: the kernel's high-water mark ``VmHWM`` is reset (``/proc/self/clear_refs`` 5) once
    the pruned model is loaded, so the peak is the training run's (meaningful in the memory run,
    whose allocator returns freed blocks). Step time: wall clock and this thread's CPU time
    (1 torch thread: the compute itself, which other jobs on a shared machine inflate far less than
    the wall clock).
    """
    import torch

    from sparseforge.finetune import FinetuneConfig, finetune_
    from sparseforge.io.models import load_model

    work = args.cost_worker
    spec = json.loads((work / "spec.json").read_text())
    ids = torch.load(work / "ids.pt")
    student = load_model(work / "pruned")
    import peft  # noqa: F401  (imported before the baseline: the import is not the run's memory)

    fc = FinetuneConfig(loss="ce", steps=spec["steps"], batch_size=spec["batch_size"], seqlen=spec["seqlen"],
                        seed=spec["seed"], warmup_steps=max(1, spec["steps"] // 10), **COST_METHODS[spec["method"]])
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss_kb = _status_kb("VmRSS")
    wall, cpu = [time.perf_counter()], [time.thread_time()]

    def stamp(info) -> None:
        wall.append(time.perf_counter())
        cpu.append(time.thread_time())

    finetune_(student, fc, data=ids["train"], evaluate=False, progress=False, callback=stamp)
    peak_kb = _status_kb("VmHWM")
    ppl = None if spec.get("memory") else _ppl(student.model, student.tokenizer, ids["eval"], spec["eval_windows"], spec["seqlen"])
    wall_ms = [1e3 * (b - a) for a, b in zip(wall, wall[1:])][1:]  # the first step warms up
    cpu_ms = [1e3 * (b - a) for a, b in zip(cpu, cpu[1:])][1:]
    print(json.dumps({"method": spec["method"], "seed": spec["seed"], "lr": fc.lr, "step_ms": statistics.median(wall_ms),
                      "step_cpu_ms": statistics.median(cpu_ms), "rss_peak_mb": peak_kb / 1024,
                      "rss_growth_mb": (peak_kb - rss_kb) / 1024, "ppl": ppl}))
    return 0


def _cost_run(work: Path, spec: dict, threads: int, memory: bool) -> dict:
    """One :func:`cost_worker` run in a fresh process: timed with the default allocator, or the memory run."""
    import subprocess

    (work / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, "--cost-worker", str(work), "--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in MEMORY_ENV}
    if memory:  # large blocks straight from mmap and back on free: RSS follows the live memory
        env.update(MEMORY_ENV)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"cost run {spec['method']} seed {spec['seed']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cost(cfg: dict, args, log) -> dict:
    """Every method of ``--cost-methods``, each run in a fresh child process, interleaved per seed; medians."""
    import tempfile

    import torch

    import sparseforge as sf
    from sparseforge.data import calibration as data
    from sparseforge.io.models import load_model

    methods = args.cost_methods.split(",")
    unknown = [m for m in methods if m not in COST_METHODS]
    if unknown:
        raise SystemExit(f"unknown --cost-methods {unknown}; choose from {', '.join(COST_METHODS)}")
    dense = load_model("builtin")
    tok = dense.tokenizer
    ids = data.corpus_token_ids(tok, "heldout") if args.cost_data == "heldout" else data.encode(tok, data.source_text(args.cost_data))
    cut = int(0.8 * ids.numel())
    train_ids, eval_ids = ids[:cut], ids[cut:]
    pruned = _prune(copy.deepcopy(dense.model), tok, "sparsegpt", "unstructured", 0.7, cfg["samples"], cfg["seqlen"])
    ppl_pruned = _ppl(pruned, tok, eval_ids, cfg["eval_windows"], cfg["seqlen"])
    log(f"cost: {args.cost_data} {train_ids.numel()} train / {eval_ids.numel()} eval tokens; SparseGPT 70% ppl {ppl_pruned:.3f}")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="bench-ft-cost-") as tmp:
        work = Path(tmp)
        sf.save_pretrained(pruned, work / "pruned", tokenizer=tok)
        torch.save({"train": train_ids, "eval": eval_ids}, work / "ids.pt")
        for seed in range(cfg["seeds"]):
            for method in methods:  # interleaved: every method once per seed, in turn
                spec = {"method": method, "seed": seed, "steps": cfg["steps"], "batch_size": cfg["batch_size"],
                        "seqlen": cfg["seqlen"], "eval_windows": cfg["eval_windows"]}
                run = _cost_run(work, spec, args.threads, memory=False)
                memory = _cost_run(work, {**spec, "steps": min(MEMORY_STEPS, spec["steps"]), "memory": True}, args.threads,
                                   memory=True)
                run.update(rss_peak_mb=memory["rss_peak_mb"], rss_growth_mb=memory["rss_growth_mb"])
                runs[method].append(run)
                log(f"cost {method} seed {seed}: {run['step_cpu_ms']:.0f} ms CPU / {run['step_ms']:.0f} ms wall per step, "
                    f"peak RSS {run['rss_peak_mb']:.0f} MB (+{run['rss_growth_mb']:.0f} MB training), ppl {run['ppl']:.3f}")
    rows = []
    for method, rs in runs.items():
        rows.append({"method": method, "lr": rs[0]["lr"], "runs": rs, "ppl": _spread([r["ppl"] for r in rs]),
                     **{k: statistics.median(r[k] for r in rs) for k in ("step_ms", "step_cpu_ms", "rss_peak_mb", "rss_growth_mb")}})
    lora = next((r for r in rows if r["method"] == "lora"), None)
    for r in rows:
        r["cpu_vs_lora"] = r["step_cpu_ms"] / lora["step_cpu_ms"] if lora else None
    return {"rows": rows, "ppl_pruned": ppl_pruned, "data": args.cost_data, "train_tokens": int(train_ids.numel()),
            "eval_tokens": int(eval_ids.numel()), "steps": cfg["steps"], "seeds": cfg["seeds"],
            "mlp": mlp_block_cost(cfg, log)}


def _alternate(variants: dict, call, repeats: int) -> dict[str, float]:
    """Median CPU ms of ``call(value)`` per variant, the variants alternating call by call after two warm-up rounds."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(repeats + 2):
        for key, value in variants.items():
            t0 = time.thread_time()
            call(value)
            if i >= 2:
                times[key].append(1e3 * (time.thread_time() - t0))
    return {k: statistics.median(ts) for k, ts in times.items()}


def _lora_layer(hidden: int, inter: int, heads: int):
    import torch
    import transformers

    from sparseforge.finetune.lora import attach_lora

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                                      num_attention_heads=heads, vocab_size=64)
    model = transformers.LlamaForCausalLM(config)
    attach_lora(model, rank=8)
    return model


def mlp_block_cost(cfg: dict, log, repeats: int = 15) -> list[dict]:
    """Forward + backward of one LoRA MLP block, and of one whole LoRA decoder layer, LoRA vs SparseLoRA.

    One random Llama layer per width with LoRA (rank 8) on every projection; SparseLoRA with 25 %
    dense output tokens; the variants alternate call by call and each keeps its median CPU time.
    MLP rows: the MLP alone at sparsity 0.9 and 0.99. Layer rows: attention + MLP, SparseLoRA on the
    MLP alone (0.9, the default) and on the MLP and attention (0.9 / 0.6, the reference's Llama-2-7B configs).
    """
    import torch

    from sparseforge.finetune.sparselora import SparseLoRA

    rows = []
    for hidden, inter, heads in ((256, 768, 4), (1024, 2816, 16)):
        model = _lora_layer(hidden, inter, heads)
        x = torch.randn(cfg["batch_size"], cfg["seqlen"], hidden, requires_grad=True)
        position_ids = torch.arange(cfg["seqlen"])[None]
        rope = model.model.rotary_emb(x, position_ids)  # (cos, sin)
        kinds = {"mlp": {"lora": (model, None)}, "layer": {"lora": (model, None)}}
        for sparsity in (0.9, 0.99):
            twin = copy.deepcopy(model)
            controller = SparseLoRA.attach(twin, sparsity=sparsity, attn_sparsity=0.0, layers="all", start=0.0)
            kinds["mlp"][f"sparselora s={sparsity:g}"] = (twin, controller)
        for label, attn in (("sparselora MLP 0.9", 0.0), ("sparselora MLP 0.9 + attention 0.6", 0.6)):
            twin = copy.deepcopy(model)
            controller = SparseLoRA.attach(twin, sparsity=0.9, attn_sparsity=attn, layers="all", start=0.0)
            kinds["layer"][label] = (twin, controller)

        def mlp_call(value) -> None:
            mlp = value[0].model.layers[0].mlp
            mlp.train()
            mlp(x).sum().backward()

        def layer_call(value) -> None:
            layer = value[0].model.layers[0]
            layer.train()
            out = layer(x, position_embeddings=rope, position_ids=position_ids)
            (out[0] if isinstance(out, tuple) else out).sum().backward()

        for kind, call in (("mlp", mlp_call), ("layer", layer_call)):
            medians = _alternate(kinds[kind], call, repeats)
            for key, ms in medians.items():
                rows.append({"hidden": hidden, "intermediate": inter, "heads": heads, "kind": kind, "variant": key,
                             "ms_cpu": ms, "vs_lora": ms / medians["lora"]})
                log(f"{kind} {hidden}x{inter} {key}: {ms:.2f} ms CPU ({rows[-1]['vs_lora']:.2f}x LoRA)")
    return rows


def _lr(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value or "-")


def markdown(result: dict) -> str:
    out = [f"CPU: {result['cpu']}; {result.get('date', '')}; torch threads {result['threads']}; {result['settings']}", ""]
    if "recovery" in result:
        out += ["| pattern | loss | lr | dense ppl | SparseGPT ppl | recovered ppl (median [min, max]) | gap recovered % (median [min, max]) | s / run |",
                "|---|---|---|---|---|---|---|---|"]
        for r in result["recovery"]["rows"]:
            p, g = r["ppl"], r["gap_recovered_pct"]
            out.append(f"| {r['pattern']} | {r['loss']} | {_lr(r.get('lr', result['lr']))} | {r['ppl_dense']:.3f} | {r['ppl_pruned']:.3f} | "
                       f"{p['median']:.3f} [{p['min']:.3f}, {p['max']:.3f}] | {g['median']:.1f} [{g['min']:.1f}, {g['max']:.1f}] | "
                       f"{r['seconds_per_run']:.0f} |")
    if "minilm" in result:
        m = result["minilm"]
        out += ["", f"| MiniLM 50% SparseGPT, SquareHead lr {_lr(m.get('lr', result['lr']))} | mean cosine, validation sentences "
                f"(tuning) | mean cosine, held-out sentences (reported) |", "|---|---|---|",
                f"| pruned | {m.get('validation_pruned', float('nan')):.4f} | {m['cosine_pruned']:.4f} |"]
        out += [f"| after {c['step']} of {m['steps']} steps | {c['validation']:.4f} | {c['heldout']:.4f} |" for c in m.get("curve", [])]
        out += [f"| after {m['steps']} steps | {m.get('validation_recovered', float('nan')):.4f} | {m['cosine_recovered']:.4f} |"]
    if "dsnot" in result:
        c = result["dsnot"]["scaled_cycles"]
        out += ["", f"| sparsity | Wanda ppl | DSnoT on Wanda, reference defaults (50 cycles) | DSnoT, {c} cycles (50 x width / 4096) |",
                "|---|---|---|---|"]
        out += [f"| {r['sparsity']:.0%} | {r['wanda']:.3f} | {r['dsnot']:.3f} | {r['dsnot_scaled']:.3f} |"
                for r in result["dsnot"]["rows"]]
    if "cost" in result:
        c = result["cost"]
        out += ["", f"Fine-tuning cost: built-in model pruned 70 % by SparseGPT (held-out ppl {c['ppl_pruned']:.3f}), CE, "
                f"{c['steps']} steps, {c['seeds']} seed(s) interleaved, data {c['data']} ({c['train_tokens']} train / "
                f"{c['eval_tokens']} eval tokens); medians:", "",
                "| method | lr | step ms CPU | CPU vs LoRA | step ms wall | peak RSS MB | RSS growth MB (training) | held-out ppl (median [min, max]) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            p = r["ppl"]
            ratio = f"{r['cpu_vs_lora']:.2f}x" if r["cpu_vs_lora"] is not None else "-"
            out.append(f"| {r['method']} | {r['lr']:g} | {r['step_cpu_ms']:.0f} | {ratio} | {r['step_ms']:.0f} | "
                       f"{r['rss_peak_mb']:.0f} | {r['rss_growth_mb']:.0f} | {p['median']:.3f} [{p['min']:.3f}, {p['max']:.3f}] |")
        lora = next((r for r in c["rows"] if r["method"] == "lora"), None)
        for r in c["rows"]:
            if lora is None or r is lora:
                continue
            lo, hi = r["ppl"], lora["ppl"]
            overlap = lo["min"] <= hi["max"] and hi["min"] <= lo["max"]
            out.append(f"\n{r['method']} vs LoRA: {r['cpu_vs_lora']:.2f}x the step CPU time (target <= 0.75x); held-out ppl "
                       f"{'within' if overlap else 'outside'} LoRA's seed spread ({lo['median']:.3f} [{lo['min']:.3f}, "
                       f"{lo['max']:.3f}] vs {hi['median']:.3f} [{hi['min']:.3f}, {hi['max']:.3f}], {c['seeds']} seeds)")
        out += ["", f"One LoRA MLP block / one whole LoRA decoder layer, forward + backward of {result['config']['batch_size']} x "
                f"{result['config']['seqlen']} tokens (25 % dense output tokens), median CPU ms, variants alternating:", "",
                "| module | hidden x intermediate (heads) | variant | ms CPU | vs LoRA |", "|---|---|---|---|---|"]
        out += [f"| {r.get('kind', 'mlp')} | {r['hidden']} x {r['intermediate']} ({r.get('heads', '-')}) | {r['variant']} | "
                f"{r['ms_cpu']:.2f} | {r['vs_lora']:.2f}x |" for r in c["mlp"]]
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
    if args.cost_worker is not None:
        return cost_worker(args)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("steps", "seeds", "eval_windows", "minilm_steps", "batch_size"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)

    def log(msg: str) -> None:
        print(msg, flush=True)

    result = {"cpu": cpu_name(), "threads": args.threads, "lr": args.lr, "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "settings": ", ".join(f"{k}={v}" for k, v in cfg.items()) + f", warm-up {args.warmup:g} of the steps, "
                          f"grad clip {args.grad_clip or 'none'}, eval split {args.eval_split}", "config": cfg}
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
