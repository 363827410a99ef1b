#!/usr/bin/env python
"""Where the time of one LoRA and one SparseLoRA training step of the built-in model goes (torch profiler, 1 thread).

Both adapters on the same built-in model (fp32, LoRA rank 8 on every linear layer, the same random
batch of ``--batch x --seqlen`` tokens, CE, AdamW), SparseLoRA with its defaults (MLP sparsity 0.9,
the first and last blocks dense, 25 % dense output tokens) past its dense start. Steps alternate
between the two; each profiled step's self CPU time is summed per category of op (matmuls by their
shapes: frozen MLP base, attention projections, LoRA factors (a rank dimension), lm_head + CE; the
SDPA kernel and RoPE; SparseLoRA's estimator and channel gathers; elementwise ops and norms; the
optimizer; autograd and dispatch), and scaled to the unprofiled thread CPU time per step.
Then the Amdahl bound: the step time SparseLoRA would reach if its skipped base channels cost
nothing and it added no overhead, at the default layers / sparsity, at every layer at 0.99, with
the attention projections skipped too (0.75, the reference's highest attention sparsity), with no
base matmul at all on the context tokens, and the LoRA step without any MLP base matmul at all.

Then the same step inside :func:`sparseforge.finetune.finetune_` (``loss="ce"``, the same adapter
settings, batch shape and thread; times from its per-step callback, no progress bar or evaluation)
against the bare steps timed before and after it: the loop's own cost per step (schedule, mask
keeper, loss bookkeeping, batch drawing). Run it once more under ``MALLOC_MMAP_THRESHOLD_=65536``
to see what that allocator setting costs every step (the old ``--cost`` runs used it).

Writes ``OUT/NAME.json`` and ``.md`` (``--name``, default ``finetune.profile``) and prints the table.

Usage::

    python benchmarks/bench_finetune_profile.py            # about two minutes on 1 core
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_finetune_profile.py --name finetune.profile.mmap64k
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_finetune import cpu_name  # noqa: E402

CATEGORIES = ("MLP base matmuls", "attention q/k/v/o matmuls", "LoRA matmuls", "lm_head + CE", "attention kernel + RoPE",
              "elementwise, norms, copies", "SparseLoRA estimator + gathers", "optimizer", "autograd, dispatch, other")


def _dims(shapes) -> set[int]:
    return {d for s in shapes if isinstance(s, list) for d in s if isinstance(d, int)}


def category(name: str, shapes, hidden: int, vocab: int, rank: int, head_dim: int) -> str:
    """The category of one profiled op from its name and input shapes (built-in Llama layout)."""
    dims = _dims(shapes)
    if name.startswith("Optimizer") or name.startswith("aten::_foreach") or name in ("aten::lerp_", "aten::addcdiv_",
                                                                                   "aten::addcmul_", "aten::sqrt"):
        return "optimizer"
    if vocab in dims or "log_softmax" in name or "nll_loss" in name:
        return "lm_head + CE"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        if rank in dims:
            return "LoRA matmuls"
        mats = [s for s in shapes if isinstance(s, list) and len(s) == 2]
        inner = {d for s in mats for d in s[1:]} | {s[0] for s in mats[1:]}  # the K and N dimensions
        return "attention q/k/v/o matmuls" if inner <= {hidden} else "MLP base matmuls"
    if any(k in name for k in ("index", "topk", "sort", "linalg_vector_norm", "aten::norm")):
        return "SparseLoRA estimator + gathers"
    if "scaled_dot_product" in name or "Flash" in name or head_dim in dims or head_dim // 2 in dims:
        return "attention kernel + RoPE"
    if name.startswith("aten::") and any(k in name for k in ("mul", "add", "silu", "sub", "div", "pow", "rsqrt", "mean", "sum",
                                                              "neg", "fill", "copy", "zero", "clone", "to", "embedding",
                                                              "cat", "empty")):
        return "elementwise, norms, copies"
    return "autograd, dispatch, other"


def finetune_step_ms(base, method: str, args) -> float:
    """Median thread CPU ms of a ``finetune_`` step of a copy of ``base`` with adapter ``method`` (CE, random tokens)."""
    import torch

    from sparseforge.finetune import FinetuneConfig, finetune_

    cfg = FinetuneConfig(loss="ce", adapter=method, lora_rank=args.rank, sparselora_sparsity=args.sparsity,
                         steps=args.steps + 2, warmup_steps=1, lr=1e-3, batch_size=args.batch, seqlen=args.seqlen)
    stream = torch.randint(2, base.config.vocab_size, (64 * args.seqlen,), generator=torch.Generator().manual_seed(0))
    stamps = [time.thread_time()]
    finetune_(copy.deepcopy(base), cfg, data=stream, kind="causal-lm", evaluate=False, progress=False,
              callback=lambda info: stamps.append(time.thread_time()))
    return statistics.median(1e3 * (b - a) for a, b in list(zip(stamps, stamps[1:]))[2:])  # the first 2 warm up


def run(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sparseforge.finetune.losses import causal_ce_loss, shift_labels
    from sparseforge.finetune.lora import attach_lora
    from sparseforge.finetune.sparselora import SparseLoRA
    from sparseforge.io.models import load_model

    torch.set_num_threads(1)
    base = load_model("builtin").model
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    models = {}
    sparse_blocks = 0
    for method in ("lora", "sparselora"):
        model = copy.deepcopy(base)
        attach_lora(model, rank=args.rank)
        if method == "sparselora":
            sparse_blocks = len(SparseLoRA.attach(model, sparsity=args.sparsity, start=0.0).modules)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        models[method] = (model, optimizer)
    torch.manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (args.batch, args.seqlen))
    mask = torch.ones_like(ids)

    def step(method: str) -> None:
        model, optimizer = models[method]
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        causal_ce_loss(out.logits, shift_labels(ids, mask)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        for method in models:
            step(method)
    cpu = {m: [] for m in models}
    for _ in range(args.steps):
        for method in models:
            t0 = time.thread_time()
            step(method)
            cpu[method].append(1e3 * (time.thread_time() - t0))
    loop = {m: finetune_step_ms(base, method=m, args=args) for m in models}
    for _ in range(args.steps):  # the bare steps again, after the loop runs
        for method in models:
            t0 = time.thread_time()
            step(method)
            cpu[method].append(1e3 * (time.thread_time() - t0))
    share = {m: collections.Counter() for m in models}
    for _ in range(args.profiled):
        for method in models:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step(method)
            for e in prof.key_averages(group_by_input_shape=True):
                share[method][category(e.key, e.input_shapes, cfg.hidden_size, cfg.vocab_size, args.rank, head_dim)] += \
                    e.self_cpu_time_total
    rows = {}
    for method in models:
        total = sum(share[method].values())
        ms = statistics.median(cpu[method])
        rows[method] = {"step_cpu_ms": ms, "steps_cpu_ms": cpu[method], "finetune_step_cpu_ms": loop[method],
                        "finetune_vs_bare": loop[method] / ms, "ms": {k: ms * share[method][k] / total for k in CATEGORIES}}
    lora = rows["lora"]
    mlp = lora["ms"]["MLP base matmuls"]
    attn = lora["ms"]["attention q/k/v/o matmuls"]
    ctx = 1 - 0.25  # context tokens (SparseLoRA's default 25 % dense output tokens)
    frac = sparse_blocks / cfg.num_hidden_layers
    bounds = {
        f"default ({sparse_blocks}/{cfg.num_hidden_layers} blocks, sparsity {args.sparsity:g})":
            lora["step_cpu_ms"] - mlp * frac * ctx * args.sparsity,
        f"every block, sparsity 0.99": lora["step_cpu_ms"] - mlp * ctx * 0.99,
        "no MLP base matmul at all (every token, every block)": lora["step_cpu_ms"] - mlp,
        "every block, MLP 0.99 + attention projections 0.75 (the reference's highest)":
            lora["step_cpu_ms"] - ctx * (mlp * 0.99 + attn * 0.75),
        "no base matmul at all on the context tokens (MLP and attention, every block)":
            lora["step_cpu_ms"] - ctx * (mlp + attn),
    }
    return {"cpu": cpu_name(), "threads": 1, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "batch": args.batch, "seqlen": args.seqlen, "rank": args.rank,
            "sparsity": args.sparsity, "sparse_blocks": sparse_blocks, "blocks": cfg.num_hidden_layers, "rows": rows,
            "bounds_ms": bounds, "bounds_vs_lora": {k: v / lora["step_cpu_ms"] for k, v in bounds.items()},
            "sparselora_vs_lora": rows["sparselora"]["step_cpu_ms"] / lora["step_cpu_ms"]}


def markdown(r: dict) -> str:
    lora, sparse = r["rows"]["lora"], r["rows"]["sparselora"]
    out = [f"CPU: {r['cpu']}; torch threads 1; built-in model fp32, batch {r['batch']} x {r['seqlen']} tokens, LoRA rank "
           f"{r['rank']}, SparseLoRA MLP sparsity {r['sparsity']:g} on {r['sparse_blocks']} of {r['blocks']} blocks; "
           "profiler self time per category scaled to the median thread CPU ms per step (unprofiled, alternating)", "",
           "| category | LoRA ms | LoRA % | SparseLoRA ms | SparseLoRA % |", "|---|---|---|---|---|"]
    for k in CATEGORIES:
        out.append(f"| {k} | {lora['ms'][k]:.1f} | {100 * lora['ms'][k] / lora['step_cpu_ms']:.1f} | {sparse['ms'][k]:.1f} | "
                   f"{100 * sparse['ms'][k] / sparse['step_cpu_ms']:.1f} |")
    out.append(f"| **step** | **{lora['step_cpu_ms']:.1f}** | 100 | **{sparse['step_cpu_ms']:.1f}** | "
               f"{100 * r['sparselora_vs_lora']:.0f} of LoRA's |")
    out += ["", "Amdahl bound: LoRA's step minus the frozen base matmuls SparseLoRA could skip (free skipping, no overhead):", "",
            "| configuration | step ms CPU | vs LoRA |", "|---|---|---|"]
    out += [f"| {k} | {v:.1f} | {r['bounds_vs_lora'][k]:.2f}x |" for k, v in r["bounds_ms"].items()]
    out.append(f"| measured SparseLoRA (default) | {sparse['step_cpu_ms']:.1f} | {r['sparselora_vs_lora']:.2f}x |")
    out += ["", f"The same steps inside finetune_ (callback times; MALLOC_MMAP_THRESHOLD_="
            f"{r.get('malloc_mmap_threshold') or 'unset'}):", "",
            "| method | bare step ms CPU | finetune_ step ms CPU | finetune_ / bare |", "|---|---|---|---|"]
    out += [f"| {m} | {row['step_cpu_ms']:.1f} | {row['finetune_step_cpu_ms']:.1f} | {row['finetune_vs_bare']:.2f}x |"
            for m, row in r["rows"].items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="unprofiled timed steps per method")
    ap.add_argument("--profiled", type=int, default=3, help="profiled steps per method")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="finetune.profile", help="file stem of the results")
    args = ap.parse_args(argv)
    result = run(args)
    table = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(result, indent=2) + "\n"), ("md", table)):
        path = args.out / f"{args.name}.{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
