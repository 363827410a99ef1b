#!/usr/bin/env python
"""Sparse-training quality on a small causal LM: dense vs RigL 90 % vs STE / SR-STE / S-STE 2:4.

A 2-layer Llama (``transformers.LlamaConfig``: hidden 128, MLP 384, 4 heads, vocabulary 4096 of
the built-in model's tokenizer) is trained **from scratch** on the built-in corpus's training
split (Shakespeare, whole works) for a few hundred AdamW steps, every method with the same data
order, step budget and learning-rate schedule, then scored by held-out perplexity
(:func:`sparseforge.evaluation.quality.perplexity` on the held-out works: Hamlet, the Sonnets, The Tempest,
Twelfth Night). The sparse methods cover the seven linear layers of every block (q, k, v, o,
gate, up, down); embeddings and the LM head stay dense. RigL uses ERK at 90 % with the RigL
paper's schedule (cosine-decayed ``alpha = 0.3``, updates every ``dT`` steps until 75 %); the N:M
trainers are ``finalize()``d (masks baked into the weights) before the perplexity is measured.

The papers lead us to expect SR-STE >= STE and S-STE >= SR-STE; the run checks this on the mean
over seeds against the seed spread, and writes what it found.

Writes ``benchmarks/results/lm_quality.json`` (``--out``) and prints a markdown table.

Usage::

    python benchmarks/bench_lm_quality.py            # 3 seeds x 300 steps, ~5-8 minutes on 1 core
    python benchmarks/bench_lm_quality.py --steps 40 --seeds 1 --methods dense sste   # smoke run
    python benchmarks/bench_lm_quality.py --grid --steps 1000      # dense + static/SET/RigL/SRigL/GMP at 80/90/95%
    python benchmarks/bench_lm_quality.py --nm-grid --steps 1000   # dense + STE/SR-STE/S-STE at 2:4 and 1:4
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from sparseforge.masks import satisfies  # noqa: E402
from sparseforge.train import GMP, SET, SRSTE, SSTE, STE, RigL, SRigL, StaticSparse  # noqa: E402

DEFAULT_METHODS = ("dense", "rigl90", "ste", "srste", "sste")
DST = {"static": StaticSparse, "set": SET, "rigl": RigL, "srigl": SRigL, "gmp": GMP}
GRID = tuple(f"{m}{s}" for m in DST for s in (80, 90, 95))  # --grid: the 80/90/95% comparison
NM_PATTERNS = {"": "2:4", "14": "1:4"}  # N:M method suffix -> pattern: "ste" is STE 2:4, "ste14" STE 1:4
NM_GRID = tuple(f"{m}{k}" for k in NM_PATTERNS for m in ("ste", "srste", "sste"))  # --nm-grid
METHODS = tuple(dict.fromkeys(DEFAULT_METHODS + GRID + NM_GRID))


def nm_pattern(method: str) -> str:
    """The N:M pattern of an N:M method name (``"ste"`` -> 2:4, ``"sste14"`` -> 1:4)."""
    return NM_PATTERNS[method[len(method.rstrip("0123456789")):]]
TARGETS = ["re:model\\.layers\\.\\d+\\.(self_attn|mlp)\\..*"]


def tokenizer_and_data():
    from transformers import AutoTokenizer

    from sparseforge.data.calibration import corpus_token_ids
    from sparseforge.io.builtin import builtin_model_path

    tok = AutoTokenizer.from_pretrained(builtin_model_path())
    return tok, corpus_token_ids(tok, "train"), corpus_token_ids(tok, "heldout")


def tiny_llama(seed: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return LlamaForCausalLM(cfg)


def make_trainer(method: str, model, opt, steps: int, interval: int, seed: int):
    if method == "dense":
        return None
    name = method.rstrip("0123456789")
    if name in DST:  # e.g. "rigl90": ERK at 90%, RigL's schedule (updates every dT steps until 75%)
        sparsity = int(method[len(name):]) / 100
        end = max(interval, int(0.75 * steps) // interval * interval)  # GMP needs a whole number of intervals
        kw = dict(sparsity=sparsity, distribution="erk", targets=TARGETS, seed=seed)
        if name == "static":
            return StaticSparse(model, opt, **kw)
        if name in ("set", "rigl", "srigl"):
            kw["drop_fraction"] = 0.3
        return DST[name](model, opt, schedule={"start_step": 0, "end_step": end, "update_interval": interval}, **kw)
    cls = {"ste": STE, "srste": SRSTE, "sste": SSTE}[method.rstrip("0123456789")]
    return cls(model, opt, pattern=nm_pattern(method), targets=TARGETS, seed=seed)


def batches(tokens: torch.Tensor, steps: int, batch: int, seqlen: int, seed: int):
    """Random windows of ``seqlen + 1`` tokens, the same sequence for every method of a seed."""
    g = torch.Generator().manual_seed(20_000 + seed)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seqlen - 1, (batch,), generator=g)
        yield torch.stack([tokens[s:s + seqlen + 1] for s in starts.tolist()])  # (B, T + 1)


def run(method: str, seed: int, data, args) -> dict:
    from sparseforge.evaluation.quality import perplexity

    tok, train_ids, heldout_ids = data
    model = tiny_llama(seed, len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, args.steps) / args.steps)))
    trainer = make_trainer(method, model, opt, args.steps, args.interval, seed)
    model.train()
    t0, losses = time.perf_counter(), []
    for x in batches(train_ids, args.steps, args.batch, args.seqlen, seed):
        logits = model(input_ids=x[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if trainer is not None:
            trainer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    out = dict(method=method, seed=seed, train_loss_last10pct=statistics.fmean(losses[-max(1, len(losses) // 10):]),
               seconds=seconds)
    if isinstance(trainer, STE):
        flips = [f.total for f in trainer.flip_rate]
        out["flip_rate_last10pct"] = statistics.fmean(flips[-max(1, len(flips) // 10):])
        if isinstance(trainer, SSTE):
            out["sste_scales"] = trainer.scales()
        names = [l.name for l in trainer.layers]
        trainer.finalize()
        modules = dict(model.named_modules())
        assert all(satisfies(modules[n].weight != 0, nm_pattern(method)) for n in names)
    elif trainer is not None:
        out["sparsity"] = 1 - trainer.num_active() / sum(l.mask.numel() for l in trainer.layers)
    res = perplexity(model, None, token_ids=heldout_ids, seqlen=args.seqlen, max_windows=args.eval_windows,
                     batch_size=16, progress=False)
    out.update(heldout_ppl=res.ppl, heldout_nll=res.nll, heldout_tokens=res.tokens)
    return out


def summarise(results: list[dict], metric: str) -> dict:
    cells: dict[str, list[float]] = {}
    for r in results:
        if metric in r:
            cells.setdefault(r["method"], []).append(r[metric])
    return {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in cells.items()}


def checks(summary: dict) -> list[dict]:
    """SR-STE >= STE, S-STE >= SR-STE, S-STE >= STE per pattern: lower held-out perplexity is better."""
    out = []
    for k in NM_PATTERNS:
        for hi, lo in (("srste" + k, "ste" + k), ("sste" + k, "srste" + k), ("sste" + k, "ste" + k)):
            a, b = summary.get(hi), summary.get(lo)
            if a is None or b is None:
                continue
            gap = a["mean"] - b["mean"]
            clear = abs(gap) > max(a["std"], b["std"]) if min(a["n"], b["n"]) > 1 else None
            out.append(dict(claim=f"{hi} better than or equal to {lo} (held-out ppl)", gap=gap, holds=gap <= 0,
                            clear=clear))
    return out


def markdown(summaries: dict, found: list[dict], meta: dict) -> str:
    lines = [f"Tiny Llama (2 layers, d=128), built-in corpus, {meta['steps']} steps x {meta['batch']} x "
             f"{meta['seqlen']} tokens, {meta['seeds']} seeds (mean ± std)", "",
             "| method | held-out ppl | train loss (last 10 %) | flip rate (last 10 %) | s / run |",
             "|---|---|---|---|---|"]
    for m in meta["methods"]:
        p, l, f, s = (summaries[k].get(m) for k in ("heldout_ppl", "train_loss_last10pct", "flip_rate_last10pct",
                                                      "seconds"))
        if p is None:
            continue
        flip = f"{f['mean']:.2e}" if f else ""
        lines.append(f"| {m} | {p['mean']:.2f} ± {p['std']:.2f} | {l['mean']:.4f} ± {l['std']:.4f} | {flip} | "
                     f"{s['mean']:.0f} |")
    lines += ["", "| claim | gap (ppl) | holds | beyond seed spread |", "|---|---|---|---|"]
    for c in found:
        spread = "n/a (1 seed)" if c["clear"] is None else ("yes" if c["clear"] else "no")
        lines.append(f"| {c['claim']} | {c['gap']:+.3f} | {'yes' if c['holds'] else 'NO'} | {spread} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--interval", type=int, default=25, help="RigL mask update interval dT")
    ap.add_argument("--eval-windows", type=int, default=128, help="held-out windows of --seqlen tokens")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    ap.add_argument("--grid", action="store_true", help="dense + static/SET/RigL/SRigL/GMP at 80/90/95%% (replaces --methods)")
    ap.add_argument("--nm-grid", action="store_true",
                    help="dense + STE / SR-STE / S-STE at 2:4 and 1:4 (names ste, ste14, ...; replaces --methods)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lm_quality.json")
    args = ap.parse_args(argv)
    if args.grid:
        args.methods = ["dense", *GRID]
    if args.nm_grid:
        args.methods = ["dense", *NM_GRID]
    torch.set_num_threads(args.threads)
    data = tokenizer_and_data()
    results, t0 = [], time.perf_counter()
    for seed in range(args.seeds):
        for m in args.methods:
            results.append(run(m, seed, data, args))
            print(f"seed {seed} {m}: ppl {results[-1]['heldout_ppl']:.2f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    metrics = ("heldout_ppl", "train_loss_last10pct", "flip_rate_last10pct", "seconds")
    summaries = {k: summarise(results, k) for k in metrics}
    found = checks(summaries["heldout_ppl"])
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), seeds=args.seeds,
                steps=args.steps, batch=args.batch, seqlen=args.seqlen, lr=args.lr, interval=args.interval,
                eval_windows=args.eval_windows, methods=args.methods, threads=args.threads,
                model="LlamaForCausalLM 2 layers, hidden 128, MLP 384, 4 heads, vocab 4096, untied",
                optimizer="AdamW (0.9, 0.95), wd 0, warmup 5 % + cosine, grad clip 1.0",
                torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpu_count=os.cpu_count(), seconds=time.perf_counter() - t0)
    table = markdown(summaries, found, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, summary=summaries, checks=found, runs=results, table=table),
                                   indent=1))
    print(table)
    print(f"\n{len(results)} runs in {meta['seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
