#!/usr/bin/env python
"""Does the SparseMixer routing gradient speed up MoE training? A small MoE LM, measured honestly.

A byte-level causal language model (vocabulary 256: the bytes of the built-in Shakespeare corpus,
no tokenizer) with ``--layers`` pre-norm transformer blocks whose FFN is a
:class:`sparseforge.moe.MoE` (SwiGLU experts). Two routing set-ups, each trained twice with the
*same* seeds, initial weights, batches and steps:

* ``top2``: 8 experts, top-2. Baseline: softmax top-2, renormalised (Mixtral; the router learns
  only through the gate values). SparseMixer: ``router="sparsemixer"``, k=2 (mid-point estimator).
* ``switch``: 8 experts, top-1. Baseline: Switch routing (gate = ``p_D``). SparseMixer: k=1.

Load-balancing loss 0.01 and z-loss 0.001 for all. Held-out loss (the corpus' held-out works,
fixed windows) is measured every ``--eval-every`` steps in eval mode (SparseMixer routes by argmax
in eval). Reported per set-up: the final held-out loss of each estimator (mean and spread over
seeds) and the number of steps SparseMixer needed to reach the baseline's *final* loss (per seed;
``null`` when it never did), i.e. the paper's "steps to the same loss" measure. The paper
(Liu et al. 2023) reports up to 2x faster convergence on Switch Transformers at scale; this is a
tiny model trained for a few minutes, so read the numbers as what they are.

Writes ``benchmarks/results/moe_convergence.json`` and ``.png`` (held-out loss vs step, mean over
seeds with min-max bands).

Usage::

    python benchmarks/bench_moe_convergence.py           # 3 seeds x 2 set-ups x 2 estimators, ~10 min on 1 core
    python benchmarks/bench_moe_convergence.py --quick   # smoke test
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
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from sparseforge.data import corpus  # noqa: E402
from sparseforge.moe import MoE  # noqa: E402

SETUPS = {  # name -> (k, baseline router, sparsemixer router)
    "top2": (2, "softmax_topk", "sparsemixer"),
    "switch": (1, "switch", "sparsemixer"),
}


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, experts: int, k: int, router: str, seed: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.moe = MoE(d, hidden, experts, k=k, router=router, seed=seed)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d/H)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, d))
        y, aux = self.moe(self.ln2(x))
        return x + y, aux


class MoELM(nn.Module):
    def __init__(self, args, k: int, router: str, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)  # identical initial weights for both estimators of a seed
        d = args.d_model
        self.emb = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.randn(args.seqlen, d) * 0.02)
        self.blocks = nn.ModuleList(
            Block(d, args.heads, args.d_hidden, args.experts, k, router, seed * 100 + i) for i in range(args.layers)
        )
        self.ln = nn.LayerNorm(d)

    def forward(self, ids):
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        aux_loss = 0.0
        for block in self.blocks:
            x, aux = block(x)
            aux_loss = aux_loss + aux.loss
        return self.ln(x) @ self.emb.weight.t(), aux_loss  # tied output layer


def byte_ids(split: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(corpus.load_text(split).encode("utf-8")), dtype=torch.uint8).long()


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def heldout_loss(model, windows) -> float:
    model.eval()
    total = 0.0
    for batch in windows.split(32):
        logits, _ = model(batch[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1), reduction="sum").item()
    model.train()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def train_one(args, setup: str, estimator: str, seed: int, train_ids, windows) -> dict:
    k, base_router, sm_router = SETUPS[setup]
    model = MoELM(args, k, base_router if estimator == "baseline" else sm_router, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(10_000 + seed)  # same batches for both estimators
    curve = []
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            curve.append((step, heldout_loss(model, windows)))
        if step == args.steps:
            break
        starts = torch.randint(0, train_ids.numel() - args.seqlen - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s: s + args.seqlen + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        logits, aux_loss = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1)) + aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - t0
    print(f"  {setup:6s} {estimator:11s} seed {seed}: final held-out {curve[-1][1]:.4f}  ({seconds:.0f} s)", flush=True)
    return {"curve": curve, "seconds": seconds}


def steps_to_reach(curve, target: float):
    for step, loss in curve:
        if loss <= target:
            return step
    return None


def summarise(runs: dict, args) -> dict:
    out = {}
    for setup in SETUPS:
        base = runs[setup]["baseline"]
        sm = runs[setup]["sparsemixer"]
        reach = [steps_to_reach(s["curve"], b["curve"][-1][1]) for b, s in zip(base, sm)]
        finals = {est: [r["curve"][-1][1] for r in runs[setup][est]] for est in ("baseline", "sparsemixer")}
        reached = [r for r in reach if r is not None]
        out[setup] = {
            "final_heldout_loss": {
                est: {"per_seed": v, "mean": statistics.mean(v), "min": min(v), "max": max(v)} for est, v in finals.items()
            },
            "sparsemixer_steps_to_baseline_final": reach,
            "speedup_per_seed": [args.steps / r if r else None for r in reach],
            "sparsemixer_better_final_in_seeds": sum(s < b for b, s in zip(finals["baseline"], finals["sparsemixer"])),
            "mean_speedup_over_seeds_that_reached": statistics.mean(args.steps / r for r in reached) if reached else None,
        }
    return out


def plot(runs: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETUPS), figsize=(6 * len(SETUPS), 4.2), squeeze=False)
    for ax, setup in zip(axes[0], SETUPS):
        for est, color in (("baseline", "tab:blue"), ("sparsemixer", "tab:red")):
            curves = [r["curve"] for r in runs[setup][est]]
            steps = [s for s, _ in curves[0]]
            losses = torch.tensor([[v for _, v in c] for c in curves])  # (seeds, points)
            label = {"baseline": SETUPS[setup][1], "sparsemixer": "sparsemixer"}[est]
            ax.plot(steps, losses.mean(0), color=color, label=f"{label} (mean of {len(curves)} seeds)")
            ax.fill_between(steps, losses.min(0).values, losses.max(0).values, color=color, alpha=0.2)
        k = SETUPS[setup][0]
        ax.set_title(f"{setup}: {args.experts} experts, top-{k}")
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out loss (nats/byte)")
        lo = min(min(v for _, v in r["curve"]) for est in runs[setup] for r in runs[setup][est])
        ax.set_ylim(lo - 0.05, lo + 1.0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 60 steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--heldout-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "moe_convergence.json")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every = 1, 60, 20
    torch.set_num_threads(args.threads)
    train_ids, held = byte_ids("train"), byte_ids("heldout")
    gen = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, held.numel() - args.seqlen - 1, (args.heldout_windows,), generator=gen).tolist()
    windows = torch.stack([held[s: s + args.seqlen + 1] for s in starts])  # fixed held-out windows
    runs = {s: {"baseline": [], "sparsemixer": []} for s in SETUPS}
    t0 = time.perf_counter()
    for setup in SETUPS:
        for seed in range(args.seeds):
            for est in ("baseline", "sparsemixer"):
                runs[setup][est].append(train_one(args, setup, est, seed, train_ids, windows))
    summary = summarise(runs, args)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "loadavg": os.getloadavg()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "setups": {s: {"k": v[0], "baseline_router": v[1], "sparsemixer_router": v[2]} for s, v in SETUPS.items()},
        "summary": summary,
        "runs": runs,
        "total_seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(runs, args, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} ({result['total_seconds']:.0f} s)")
    print("| set-up | baseline final | sparsemixer final | SparseMixer steps to baseline's final loss (per seed) |")
    print("|---|---|---|---|")
    for setup, s in summary.items():
        f = s["final_heldout_loss"]
        print(f"| {setup} | {f['baseline']['mean']:.4f} ({f['baseline']['min']:.4f}-{f['baseline']['max']:.4f}) | "
              f"{f['sparsemixer']['mean']:.4f} ({f['sparsemixer']['min']:.4f}-{f['sparsemixer']['max']:.4f}) | "
              f"{s['sparsemixer_steps_to_baseline_final']} of {args.steps} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
