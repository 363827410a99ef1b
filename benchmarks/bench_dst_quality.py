#!/usr/bin/env python
"""Sparse-training quality: dense vs static random vs SET vs RigL vs SRigL vs sparse momentum vs GMP on sklearn's digits.

A 64-300-100-10 MLP (LeNet-300-100 with digits' 64 inputs) is trained on scikit-learn's bundled
8x8 digits (1797 images, no download; 1297 train / 500 test, fixed split), with every method at
80 / 90 / 95 % sparsity over all three linear layers, several seeds, and the *same* step budget,
optimizer and learning-rate schedule. Sparse methods share the ERK layer-wise distribution and
(for SET and RigL) the same drop schedule (RigL paper's setting: cosine-decayed ``alpha=0.3``,
updates every ``dT`` steps until 75 % of training), so SET and RigL differ only in how they grow.
GMP prunes from dense along Zhu & Gupta's cubic ramp between 10 % and 60 % of training.
SRigL (constant fan-in, ``gamma_sal = 0.3``) and ``rigl_fanin`` (RigL's per-neuron drop and
grow under constant fan-in, no ablation: SRigL's ablation-free baseline) use RigL's schedule; sparse momentum the same
update steps with its paper's prune rate ``p = 0.5`` (cosine-decayed) and momentum 0.9.

The papers lead us to expect RigL >= SET >= static at equal sparsity; the run *checks* it (by the
mean over seeds, and says whether the gap exceeds the seed-to-seed spread) and writes what it
found, not what was expected.

Writes ``benchmarks/results/dst_quality.json`` (``--out`` to change) and prints a markdown table.

Usage::

    python benchmarks/bench_dst_quality.py --quick      # 3 seeds x 1500 steps, well under 3 minutes on 1 core
    python benchmarks/bench_dst_quality.py              # 5 seeds x 4000 steps
    python benchmarks/bench_dst_quality.py --nm --quick # N:M: 2:4 and 1:4, STE vs SR-STE vs S-STE vs STE+MDGF
                                                  # (JSON section "nm"; "nm_full" without --quick)
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
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_output import write_json  # noqa: E402
from sparseforge.masks import satisfies  # noqa: E402
from sparseforge.train import SSTE  # noqa: E402
from sparseforge.train import GMP, SET, SRSTE, STE, RigL, SparseMomentum, SRigL, StaticSparse  # noqa: E402

METHODS = ("dense", "static", "set", "rigl", "rigl_fanin", "srigl", "sm", "gmp")
SPARSITIES = (0.8, 0.9, 0.95)
NM_PATTERNS = ("2:4", "1:4")
WIDTHS = (64, 300, 100, 10)


def load_digits_split(seed: int = 0):
    """Digits as float tensors in [0, 1], a fixed 1297 / 500 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:500], order[500:]
    return x[train], y[train], x[test], y[test]


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(WIDTHS, WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_nm_trainer(method: str, net, opt, pattern: str, steps: int, seed: int):
    """S-STE (``"sste"``), MDGF and SDGF variants (``"ste+mdgf"``, ``"srste+mdgf"``, ``"ste+sdgf"``).

    MDGF (Bambhaniya et al. 2024, exponential decay): ``beta_t = exp(-k t)`` with ``k`` chosen so
    that ``beta`` reaches 0.01 at half of training (our choice; the paper tunes ``k`` per model).
    SDGF (same paper, stepwise structure decay): dense for the first 10% of the steps, then
    3:4 -> 2:4 (-> 1:4) in equal shares up to half of training, the target pattern after that (our
    choice of phase lengths, comparable with the MDGF setting).
    """
    if method == "sste":
        return SSTE(net, opt, pattern=pattern, seed=seed)
    base, _, option = method.partition("+")
    if option not in ("mdgf", "sdgf") or base not in ("ste", "srste"):
        raise ValueError(method)
    if option == "sdgf":
        decay = dict(structure_decay="stepwise", structure_decay_start=steps // 10, structure_decay_end=steps // 2)
    else:
        decay = dict(flow_decay="exp", flow_decay_coef=math.log(100.0) / (0.5 * steps))
    if base == "ste":
        return STE(net, opt, pattern=pattern, seed=seed, **decay)
    return SRSTE(net, opt, pattern=pattern, seed=seed, **decay)


def make_trainer(method: str, net, opt, sparsity, steps: int, interval: int, seed: int):
    if method == "sste" or method.endswith(("+mdgf", "+sdgf")):
        return make_nm_trainer(method, net, opt, sparsity, steps, seed)
    if method == "ste":  # N:M: ``sparsity`` is the pattern string
        return STE(net, opt, pattern=sparsity, seed=seed)
    if method.startswith("srste"):  # "srste" (paper's lambda_W = 2e-4) or "srste:<lambda>"
        decay = float(method.split(":")[1]) if ":" in method else 2e-4
        return SRSTE(net, opt, pattern=sparsity, decay=decay, seed=seed)
    common = dict(sparsity=sparsity, distribution="erk", seed=seed)
    if method == "static":
        return StaticSparse(net, opt, **common)
    if method == "rigl_fanin":  # RigL under constant fan-in without ablation: SRigL's baseline
        common["pattern"] = "fanin"
        method = "rigl"
    if method in ("set", "rigl"):
        cls = SET if method == "set" else RigL
        end = int(0.75 * steps)
        return cls(net, opt, drop_fraction=0.3, drop_fraction_decay="cosine",
                   schedule={"start_step": 0, "end_step": end, "update_interval": interval}, **common)
    if method in ("srigl", "sm"):
        sched = {"start_step": 0, "end_step": int(0.75 * steps), "update_interval": interval}
        if method == "srigl":
            return SRigL(net, opt, drop_fraction=0.3, gamma_sal=0.3, schedule=sched, **common)
        return SparseMomentum(net, opt, drop_fraction=0.5, momentum=0.9, schedule=sched, **common)
    if method == "gmp":
        start = interval * round(0.1 * steps / interval)
        end = interval * round(0.6 * steps / interval)
        return GMP(net, opt, schedule={"start_step": start, "end_step": end, "update_interval": interval}, **common)
    raise ValueError(method)


def run(method: str, sparsity: float, seed: int, data, steps: int, interval: int, batch: int, lr: float) -> dict:
    xtr, ytr, xte, yte = data
    net = mlp(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    trainer = None if method == "dense" else make_trainer(method, net, opt, sparsity, steps, interval, seed)
    active0 = None if trainer is None else trainer.num_active()
    g = torch.Generator().manual_seed(10_000 + seed)
    perm, pos, updates, changed = torch.randperm(len(xtr), generator=g), 0, 0, 0
    t0 = time.perf_counter()
    for _ in range(steps):
        if pos + batch > len(xtr):
            perm, pos = torch.randperm(len(xtr), generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if trainer is not None:
            up = trainer.step()
            if up is not None:
                updates += 1
                changed += sum(grown for _, grown in up.changed.values())
    seconds = time.perf_counter() - t0
    nm = isinstance(trainer, STE)
    if nm:  # flip rate (Zhou et al. Eq. 4) per step, then bake the masks into the weights
        flips = [f.total for f in trainer.flip_rate]
        tenth = max(1, steps // 10)
        flip_curve = [statistics.fmean(flips[i:i + tenth]) for i in range(0, steps, tenth)]
        layer_sparsity, active_constant = trainer.sparsities(), trainer.num_active() == active0
        trainer.finalize()
        assert all(satisfies(m.weight != 0, sparsity) for m in net if isinstance(m, nn.Linear))
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item() * 100
        train_loss = nn.functional.cross_entropy(net(xtr), ytr).item()
    weights = [m.weight for m in net if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)  # >= masked: a grown weight can still be exactly 0
    masked = 0 if trainer is None or nm else sum(int((~l.mask).sum()) for l in trainer.layers)
    if nm:
        return dict(method=method, pattern=sparsity, seed=seed, test_acc=acc, train_loss=train_loss,
                    zero_fraction=zeros / total, seconds=seconds, layer_sparsity=layer_sparsity,
                    active_constant=active_constant, flip_rate_last10pct=flip_curve[-1],
                    flip_rate_mean=statistics.fmean(flips), flip_rate_by_tenth=flip_curve)
    out = dict(method=method, sparsity=0.0 if method == "dense" else sparsity, seed=seed, test_acc=acc,
               train_loss=train_loss, mask_sparsity=masked / total, zero_fraction=zeros / total, seconds=seconds,
               mask_updates=updates, weights_regrown=changed)
    if isinstance(trainer, SRigL):
        out["ablated_neurons"] = dict(trainer.ablated)
        out["fan_in"] = dict(trainer.fan_in)
    if trainer is not None:
        out["layer_sparsity"] = trainer.sparsities()
        out["active_constant"] = trainer.num_active() == active0 if method != "gmp" else None
    return out


def summarise(results: list[dict], metric: str) -> dict:
    cells: dict[str, list[float]] = {}
    for r in results:
        key = r["method"] if r["method"] == "dense" else f"{r['method']}@{r['sparsity']}"
        cells.setdefault(key, []).append(r[metric])
    return {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in cells.items()}


def check_order(summary: dict, metric: str, higher_is_better: bool) -> list[dict]:
    """RigL >= SET >= static, per sparsity, by the mean; 'clear' when the gap exceeds both spreads."""
    checks = []
    sign = 1.0 if higher_is_better else -1.0
    for s in SPARSITIES:
        for hi, lo in (("rigl", "set"), ("set", "static"), ("rigl", "static"), ("srigl", "rigl"), ("srigl", "rigl_fanin"),
                       ("sm", "set"), ("sm", "rigl")):
            a, b = summary.get(f"{hi}@{s}"), summary.get(f"{lo}@{s}")
            if a is None or b is None:
                continue
            gap = a["mean"] - b["mean"]
            clear = abs(gap) > max(a["std"], b["std"]) if min(a["n"], b["n"]) > 1 else None
            checks.append(dict(metric=metric, sparsity=s, claim=f"{hi} better than or equal to {lo}", gap=gap,
                               holds=sign * gap >= 0, clear=clear))
    return checks


def _yes_no(value: bool | None) -> str:
    return "n/a (1 seed)" if value is None else ("yes" if value else "no")


def markdown(summaries: dict, checks: list[dict], meta: dict) -> str:
    lines = [f"Digits, MLP {'-'.join(map(str, WIDTHS))}, {meta['steps']} steps, {meta['seeds']} seeds "
             "(mean ± std), ERK layer-wise sparsity, same optimizer and step budget for every method"]
    for metric, title, fmt in (("test_acc", "test accuracy (%)", "{:.2f} ± {:.2f}"),
                               ("train_loss", "final training loss", "{:.4f} ± {:.4f}")):
        summary = summaries[metric]
        lines += ["", f"| {title} | " + " | ".join(f"{int(s * 100)}%" for s in SPARSITIES) + " |",
                  "|---|" + "---|" * len(SPARSITIES)]
        d = summary["dense"]
        lines.append("| dense | " + " | ".join(fmt.format(d["mean"], d["std"]) for _ in SPARSITIES) + " |")
        for m in METHODS[1:]:
            row = [summary.get(f"{m}@{s}") for s in SPARSITIES]
            lines.append(f"| {m} | " + " | ".join(fmt.format(c["mean"], c["std"]) if c else "-" for c in row) + " |")
    lines += ["", "| metric | sparsity | claim | gap | holds | beyond seed spread |", "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['metric']} | {int(c['sparsity'] * 100)}% | {c['claim']} | {c['gap']:+.4g} | "
                     f"{'yes' if c['holds'] else 'NO'} | {_yes_no(c['clear'])} |")
    return "\n".join(lines)


def summarise_nm(results: list[dict], metric: str) -> dict:
    cells: dict[str, list[float]] = {}
    for r in results:
        if metric in r:
            key = r["method"] if r["method"] == "dense" else f"{r['method']}@{r['pattern']}"
            cells.setdefault(key, []).append(r[metric])
    return {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in cells.items()}


def _pair_check(summaries: dict, metric: str, higher: bool, pattern: str, hi: str, lo: str) -> dict | None:
    """Claim "``hi`` >= ``lo``" (``higher``) or "<=" on ``metric`` at ``pattern``, with the gap and whether
    it exceeds the seed spread; None when a cell is missing."""
    a, b = summaries[metric].get(f"{hi}@{pattern}"), summaries[metric].get(f"{lo}@{pattern}")
    if a is None or b is None:
        return None
    gap = a["mean"] - b["mean"]
    clear = abs(gap) > max(a["std"], b["std"]) if min(a["n"], b["n"]) > 1 else None
    return dict(metric=metric, pattern=pattern, claim=f"{hi} {'>=' if higher else '<='} {lo}",
                gap=gap, holds=(gap >= 0) == higher or gap == 0, clear=clear)


def check_nm(summaries: dict, methods: list[str]) -> list[dict]:
    """SR-STE >= STE (test accuracy; lower training loss) and a lower late flip rate for SR-STE."""
    checks = []
    for pattern in NM_PATTERNS:
        for sr in (m for m in methods if m.startswith("srste")):
            for metric, higher in (("test_acc", True), ("train_loss", False), ("flip_rate_last10pct", False)):
                checks.append(_pair_check(summaries, metric, higher, pattern, sr, "ste"))
    return [c for c in checks if c is not None]


def check_nm_extra(summaries: dict, methods: list[str]) -> list[dict]:
    """S-STE >= SR-STE and >= STE (Hu et al. 2024); STE+MDGF / +SDGF >= STE (Bambhaniya et al. 2024), by test accuracy."""
    pairs = [("sste", "srste"), ("sste", "ste"), ("ste+mdgf", "ste"), ("srste+mdgf", "srste"), ("ste+sdgf", "ste")]
    checks = []
    for pattern in NM_PATTERNS:
        for hi, lo in pairs:
            if hi not in methods or lo not in methods:
                continue
            for metric, higher in (("test_acc", True), ("train_loss", False)):
                checks.append(_pair_check(summaries, metric, higher, pattern, hi, lo))
    return [c for c in checks if c is not None]


def markdown_nm(summaries: dict, checks: list[dict], methods: list[str], meta: dict) -> str:
    lines = [f"N:M training on digits, MLP {'-'.join(map(str, WIDTHS))} (all three layers N:M), "
             f"{meta['steps']} steps, {meta['seeds']} seeds (mean ± std)"]
    for metric, title, fmt in (("test_acc", "test accuracy (%)", "{:.2f} ± {:.2f}"),
                               ("train_loss", "final training loss", "{:.4f} ± {:.4f}"),
                               ("flip_rate_last10pct", "flip rate, last 10% of steps", "{:.2e} ± {:.1e}"),
                               ("flip_rate_mean", "flip rate, mean over training", "{:.2e} ± {:.1e}")):
        summary = summaries[metric]
        lines += ["", f"| {title} | " + " | ".join(NM_PATTERNS) + " |", "|---|" + "---|" * len(NM_PATTERNS)]
        if metric in ("test_acc", "train_loss"):
            d = summary["dense"]
            lines.append("| dense | " + " | ".join(fmt.format(d["mean"], d["std"]) for _ in NM_PATTERNS) + " |")
        for m in methods:
            row = [summary.get(f"{m}@{p}") for p in NM_PATTERNS]
            lines.append(f"| {m} | " + " | ".join(fmt.format(c["mean"], c["std"]) if c else "-" for c in row) + " |")
    lines += ["", "| metric | pattern | claim | gap | holds | beyond seed spread |", "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['metric']} | {c['pattern']} | {c['claim']} | {c['gap']:+.4g} | "
                     f"{'yes' if c['holds'] else 'NO'} | {_yes_no(c['clear'])} |")
    return "\n".join(lines)


def save_section(path: Path, key: str | None, payload: dict) -> None:
    """Write ``payload`` (``key`` None: the DST section at top level; else under ``key``), keeping the other part."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    if key is None:
        data = {**payload, **{k: v for k, v in old.items() if k.startswith("nm")}}
    else:
        data = {**old, key: payload}
    write_json(path, data, indent=1)


def main_nm(args, seeds: int, steps: int) -> int:
    methods = ["ste"] + [("srste" if d == 2e-4 else f"srste:{d:g}") for d in args.nm_decays] + list(args.nm_extra)
    data = load_digits_split()
    results, t0 = [], time.perf_counter()
    for seed in range(seeds):
        results.append(run("dense", 0.0, seed, data, steps, args.interval, args.batch, args.lr))
        for pattern in NM_PATTERNS:
            for m in methods:
                results.append(run(m, pattern, seed, data, steps, args.interval, args.batch, args.lr))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    metrics = ("test_acc", "train_loss", "flip_rate_last10pct", "flip_rate_mean")
    summaries = {m: summarise_nm(results, m) for m in metrics}
    checks = check_nm(summaries, methods) + check_nm_extra(summaries, methods)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                quick=args.quick, seeds=seeds, steps=steps, batch=args.batch, lr=args.lr, threads=args.threads,
                widths=WIDTHS, patterns=NM_PATTERNS, methods=methods, srste_decays=args.nm_decays,
                optimizer="SGD nesterov 0.9, wd 1e-4, cosine lr", torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine(), cpu_count=os.cpu_count(),
                seconds=time.perf_counter() - t0)
    table = markdown_nm(summaries, checks, methods, meta)
    section = "nm" if args.quick else "nm_full"
    save_section(args.out, section, dict(meta=meta, summary=summaries, checks=checks, runs=results, table=table))
    print(table)
    print(f"\n{len(results)} runs in {meta['seconds']:.0f} s; wrote the '{section}' section of {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds x 1500 steps (under 3 minutes)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3 quick, 5 full)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 1500 quick, 4000 full)")
    ap.add_argument("--interval", type=int, default=50, help="mask update interval dT (default 50)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for this size)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "dst_quality.json")
    ap.add_argument("--nm", action="store_true", help="N:M training instead: 2:4 and 1:4, STE vs SR-STE")
    ap.add_argument("--nm-decays", type=float, nargs="+", default=[2e-4],
                    help="SR-STE lambda_W values (default: the paper's 2e-4)")
    ap.add_argument("--nm-extra", nargs="*", default=["sste", "ste+mdgf", "ste+sdgf"],
                    choices=["sste", "ste+mdgf", "srste+mdgf", "ste+sdgf"],
                    help="further N:M methods (default: S-STE, and STE with MDGF exponential gradient-flow decay "
                         "or SDGF stepwise structure decay)")
    args = ap.parse_args(argv)
    seeds = args.seeds or (3 if args.quick else 5)
    steps = args.steps or (1500 if args.quick else 4000)
    torch.set_num_threads(args.threads)
    if args.nm:
        return main_nm(args, seeds, steps)

    data = load_digits_split()
    results, t0 = [], time.perf_counter()
    for seed in range(seeds):
        results.append(run("dense", 0.0, seed, data, steps, args.interval, args.batch, args.lr))
        for s in SPARSITIES:
            for m in METHODS[1:]:
                results.append(run(m, s, seed, data, steps, args.interval, args.batch, args.lr))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    summaries = {m: summarise(results, m) for m in ("test_acc", "train_loss")}
    checks = check_order(summaries["test_acc"], "test_acc", True) + check_order(summaries["train_loss"], "train_loss", False)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                quick=args.quick, seeds=seeds, steps=steps, interval=args.interval, batch=args.batch, lr=args.lr,
                threads=args.threads, widths=WIDTHS, distribution="erk", drop_fraction=0.3,
                drop_fraction_decay="cosine (SET and RigL)", optimizer="SGD nesterov 0.9, wd 1e-4, cosine lr",
                torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpu_count=os.cpu_count(), seconds=time.perf_counter() - t0)
    table = markdown(summaries, checks, meta)
    save_section(args.out, None, dict(meta=meta, summary=summaries, checks=checks, runs=results, table=table))
    print(table)
    print(f"\n{len(results)} runs in {meta['seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
