#!/usr/bin/env python
"""Iterative pruning quality: IMP with rewinding vs SWAMP vs Sparse Model Soups on sklearn's digits.

Same MLP (64-300-100-10), data split and optimizer as ``dst_quality.py``. Every training phase is
``--phase-steps`` steps of SGD (Nesterov 0.9, wd 1e-4, lr 0.05 cosine, restarted each phase),
batch 64; ``--rounds`` pruning rounds to the target sparsity (ERK layer-wise, the same fraction of
the remaining weights each round) through :mod:`sparseforge.train.iterative`:

* ``imp``: rewind to the initial weights after each prune; ``rounds + 1`` trainings.
* ``swamp``: as IMP with ``--particles`` particles per round (different batch orders), averaged,
  the average pruned; ``particles`` times IMP's training compute.
* ``prune_retrain``: dense pre-training, then ``rounds`` prune / retrain phases, no rewinding
  (SMS with one particle: the baseline that isolates SMS's averaging).
* ``sms``: dense pre-training (one phase), then ``rounds`` prune / retrain ``particles`` copies
  (different batch orders) / average phases, no rewinding.

Expected from the papers (checked, not assumed): SWAMP >= IMP; SMS >= prune-retrain. IMP and
SWAMP end with one phase trained from the rewound initial weights; prune-retrain and SMS keep
training the same weights (``rounds + 1`` phases in a row), so compare within the two pairs. Writes
``benchmarks/results/iterative_quality.json`` and prints a markdown table.

Usage::

    python benchmarks/bench_iterative_quality.py            # 3 seeds, 90 and 95 %, 4 rounds x 400 steps
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_dst_quality import load_digits_split, mlp  # noqa: E402
from sparseforge.train import imp, sparse_model_soup, swamp  # noqa: E402

METHODS = ("dense", "imp", "swamp", "prune_retrain", "sms")


def make_train_fn(data, steps: int, batch: int, lr: float, seed: int):
    xtr, ytr = data[0], data[1]

    def train_fn(model, r, p):
        g = torch.Generator().manual_seed(1_000_000 * seed + 1000 * (r + 1) + p)  # batch order per round, particle
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        perm, pos = torch.randperm(len(xtr), generator=g), 0
        model.train()
        for _ in range(steps):
            if pos + batch > len(xtr):
                perm, pos = torch.randperm(len(xtr), generator=g), 0
            idx = perm[pos:pos + batch]
            pos += batch
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()

    return train_fn


def run(method: str, sparsity: float, seed: int, data, args) -> dict:
    xtr, ytr, xte, yte = data
    net = mlp(seed)
    train_fn = make_train_fn(data, args.phase_steps, args.batch, args.lr, seed)
    t0 = time.perf_counter()
    trainings = 1
    options = dict(distribution="erk")
    if method == "dense":
        train_fn(net, 0, 0)
    elif method == "imp":
        trainings = imp(net, train_fn, args.rounds, sparsity, **options).trainings
    elif method == "swamp":
        trainings = swamp(net, train_fn, args.rounds, sparsity, particles=args.particles, **options).trainings
    elif method in ("sms", "prune_retrain"):
        train_fn(net, -1, 0)  # dense pre-training
        particles = args.particles if method == "sms" else 1
        trainings = 1 + sparse_model_soup(net, train_fn, args.rounds, sparsity, particles=particles,
                                          **options).trainings
    seconds = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item() * 100
        loss = nn.functional.cross_entropy(net(xtr), ytr).item()
    weights = [m.weight for m in net if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return dict(method=method, sparsity=0.0 if method == "dense" else sparsity, seed=seed, test_acc=acc,
                train_loss=loss, zero_fraction=zeros, trainings=trainings, seconds=seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--particles", type=int, default=3)
    ap.add_argument("--phase-steps", type=int, default=400, help="optimizer steps per training phase")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "iterative_quality.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    results, t0 = [], time.perf_counter()
    for seed in range(args.seeds):
        results.append(run("dense", 0.0, seed, data, args))
        for s in args.sparsities:
            for m in METHODS[1:]:
                results.append(run(m, s, seed, data, args))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    summary: dict[str, dict] = {}
    for metric in ("test_acc", "train_loss"):
        cells: dict[str, list[float]] = {}
        for r in results:
            key = r["method"] if r["method"] == "dense" else f"{r['method']}@{r['sparsity']}"
            cells.setdefault(key, []).append(r[metric])
        summary[metric] = {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "n": len(v)}
                           for k, v in cells.items()}
    lines = [f"Digits MLP, {args.rounds} rounds x {args.phase_steps} steps, {args.particles} particles, "
             f"{args.seeds} seeds (mean ± std)", "",
             "| method | trainings | " + " | ".join(f"acc {int(s * 100)}%" for s in args.sparsities) + " | "
             + " | ".join(f"loss {int(s * 100)}%" for s in args.sparsities) + " |",
             "|---|---|" + "---|" * (2 * len(args.sparsities))]
    for m in METHODS:
        keys = ["dense"] * len(args.sparsities) if m == "dense" else [f"{m}@{s}" for s in args.sparsities]
        n = next(r["trainings"] for r in results if r["method"] == m)
        acc = [summary["test_acc"][k] for k in keys]
        loss = [summary["train_loss"][k] for k in keys]
        lines.append(f"| {m} | {n} | " + " | ".join(f"{c['mean']:.2f} ± {c['std']:.2f}" for c in acc) + " | "
                     + " | ".join(f"{c['mean']:.4f} ± {c['std']:.4f}" for c in loss) + " |")
    table = "\n".join(lines)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                seeds=args.seeds, rounds=args.rounds, particles=args.particles, phase_steps=args.phase_steps,
                sparsities=args.sparsities, batch=args.batch, lr=args.lr, threads=args.threads,
                distribution="erk", torch=torch.__version__, python=platform.python_version(),
                seconds=time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, summary=summary, runs=results, table=table), indent=1))
    print(table)
    print(f"\n{len(results)} runs in {meta['seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
