"""KV-cache policies, quality measured honestly: recall at 1K-8K, perplexity, attention-output error
(issue 16, section 2).

1. **MQAR recall** (multi-query associative recall; :mod:`sparseforge.data.mqar`) of the shipped MQAR
   model (:func:`sparseforge.evaluation.mqar.load_mqar_model`): the induction circuit whose weights
   ``scripts/build_mqar_model.py`` sets by hand, not a trained model: its attention is one sharp
   peak on one channel per answer, so its rows are an upper bound on what a policy keeps
   (``--mqar-model DIR``: a model written by ``scripts/train_mqar.py --out DIR``; the table header
   names the model): per context (1K, 2K, 4K, 8K), 64 key-value pairs scattered uniformly over the context, then 32
   queries, each a **decode step** on a ``PagedKVCache`` with the policy (the value teacher-forced
   next). Accuracy = answers equal to the value. The context is prefilled once (dense) and the
   cache copied per policy; SnapKV chooses at prefill, so it gets its own. Budgets are fractions of
   the context (tokens read per KV head and step):

   * ``streaming``: StreamingLLM(sinks=4, window=budget-4);
   * ``quest``: Quest(budget, page 16, dense_layers=0): the model has 2 layers, so the paper's
     dense first two layers would leave nothing sparse;
   * ``double_sparsity``: DoubleSparsity(channels=head_dim/4, budget), label channels calibrated
     on 4 MQAR examples of 512 tokens;
   * ``snapkv``: SnapKV(window=32, capacity=budget) (its votes come from the last context tokens,
     which cannot know the later questions);
   * ``mustafar``: Mustafar(sparsity, recent=256) reads every token with ``1 - sparsity`` of its
     channels, so its "budget" column is the fraction of channels kept.

2. **Perplexity** of the built-in model (``builtin``, 6 layers, head_dim 64) at its full context
   (512 tokens, its position table): windows of the held-out split, the first 256 tokens prefilled,
   the next 256 decoded one token at a time with the policy (teacher-forced), PPL over the decoded
   predictions; the same positions for every policy (Quest keeps its two dense layers here;
   Mustafar recent=64, so 256 tokens are compressed from token 320 on; Double Sparsity calibrated on
   the 4 windows after the measured ones). The model was trained on 256-token windows, so dense
   attention over tokens 257-511 is outside its training range and a local window can *lower* its
   perplexity: dense is not a ceiling here, the relative error of the attention outputs is the
   cleaner signal.
3. **Attention-output error**: during that decode, the input of every layer's ``o_proj`` (the
   attention output, all heads) is compared with the Dense run's: relative Frobenius error
   ``||out - out_dense|| / ||out_dense||`` over all layers, steps and windows (it compounds over
   layers and steps, as in use).

    python benchmarks/bench_kv_quality.py --quick     # 1K and 2K, fewer examples, ~minutes
    python benchmarks/bench_kv_quality.py             # 1K-8K

Writes ``benchmarks/results/kv_quality.json`` (``--quick``: ``kv_quality.quick.json``) and prints the
tables and the checks (dense recall ~100%, query-aware vs StreamingLLM at each budget).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from sparseforge.attention import (Dense, DoubleSparsity, Mustafar, PagedKVCache, Quest, SnapKV, StreamingLLM,
                                   calibrate_label_channels, enable)
from sparseforge.data.mqar import make_batch
from sparseforge.evaluation.mqar import answer, load_mqar_model, mqar_vocab, prefill
from sparseforge.runtime.machine import machine_info

PAGE = 16
SINKS = 4
POLICIES = ("dense", "streaming", "quest", "double_sparsity", "snapkv", "mustafar")
BUDGETED = ("streaming", "quest", "double_sparsity", "snapkv")
PPL_SEQLEN = 512  # the built-in model's position table


def budget_tokens(context: int, fraction: float) -> int:
    """Tokens per KV head for a budget ``fraction`` of ``context``: whole pages, at least 2."""
    return max(2 * PAGE, int(round(context * fraction / PAGE)) * PAGE)


def make_policy(name: str, budget: int, *, labels=None, channels: int = 0, quest_dense_layers: int = 0,
                mustafar_sparsity: float = 0.7, mustafar_recent: int = 256):
    """The policy ``name`` at ``budget`` tokens (see the module doc for the settings)."""
    if name == "dense":
        return Dense()
    if name == "streaming":
        return StreamingLLM(sinks=SINKS, window=budget - SINKS)
    if name == "quest":
        return Quest(budget=budget, page_size=PAGE, dense_layers=quest_dense_layers)
    if name == "double_sparsity":
        return DoubleSparsity(channels=channels, budget=budget, labels=labels)
    if name == "snapkv":
        return SnapKV(window=32, capacity=budget)
    if name == "mustafar":
        return Mustafar(sparsity=mustafar_sparsity, recent=mustafar_recent)
    raise ValueError(f"unknown policy {name!r}")


def policy_grid(length: int, fractions, mustafar_levels, **settings):
    """``(name, label, budget tokens or None, policy)``: Dense, each budgeted policy at each fraction of
    ``length`` (SnapKV only above its 32-token window), Mustafar at each sparsity; ``settings`` go to
    :func:`make_policy`."""
    yield "dense", "full", None, Dense()
    for fraction in fractions:
        budget = budget_tokens(length, fraction)
        for name in BUDGETED:
            if name == "snapkv" and budget <= 32:
                continue
            yield name, fraction_label(fraction), budget, make_policy(name, budget, **settings)
    for sparsity in mustafar_levels:
        yield "mustafar", f"{1 - sparsity:.0%} channels", None, make_policy("mustafar", 0, mustafar_sparsity=sparsity,
                                                                           **settings)


# ---------------------------------------------------------------------------------------------- recall
def mqar_labels(model, vocab, channels: int):
    """Double Sparsity label channels of the MQAR model from 4 MQAR examples of 512 tokens."""
    b = make_batch(4, 448, 64, 32, vocab, generator=torch.Generator().manual_seed(99))
    return calibrate_label_channels(model, [b.ids], channels=channels)


def recall_rows(model, contexts, fractions, mustafar_levels, examples: int, pairs: int, queries: int, seed: int = 0):
    """One row per (context, policy, budget): recall accuracy over ``examples x queries`` answers."""
    vocab = mqar_vocab(model)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    channels = max(1, head_dim // 4)
    labels = mqar_labels(model, vocab, channels)
    rows = []
    for context in contexts:
        batch = make_batch(examples, context, pairs, queries, vocab, generator=torch.Generator().manual_seed(seed + context))
        t0 = time.perf_counter()
        base = prefill(model, batch)  # dense prefill shared by the decode-time policies
        prefill_s = time.perf_counter() - t0

        def run(name, label, policy, budget=None):
            t = time.perf_counter()
            if name == "snapkv":
                cache = prefill(model, batch, policy, PAGE)
            else:
                cache = copy.deepcopy(base)
                cache.set_policy(policy)
            correct = answer(model, batch, cache)
            rows.append({"context": context, "policy": name, "budget": label, "budget_tokens": budget,
                         "tokens": batch.ids.shape[1],
                         "accuracy": float(correct.float().mean()),
                         "answers": int(correct.numel()), "read_fraction": cache.read_fraction(),
                         "seconds": round(time.perf_counter() - t, 2)})
            print(f"  recall {context:>5} {name:<16} {label:<8} {rows[-1]['accuracy']:.3f}", flush=True)

        for name, label, budget, policy in policy_grid(context, fractions, mustafar_levels, labels=labels, channels=channels):
            run(name, f"{label} context" if budget else label, policy, budget)
        rows.append({"context": context, "policy": "_prefill", "seconds": round(prefill_s, 2)})
    return rows


# ------------------------------------------------------------------------------ perplexity + attention
def builtin_windows(tokenizer, windows: int, seqlen: int):
    from sparseforge.data.calibration import corpus_token_ids

    ids = corpus_token_ids(tokenizer, "heldout")
    if ids.numel() < windows * seqlen:
        raise SystemExit(f"the held-out split has {ids.numel()} tokens, fewer than {windows} x {seqlen}")
    return ids[: windows * seqlen].view(windows, seqlen)


@torch.no_grad()
def decode_nll(model, ids, policy, prompt: int):
    """Teacher-forced decode of ``ids[:, prompt:]`` after a prefill of ``ids[:, :prompt]``.

    Returns (NLL sum, predictions, attention outputs: per layer a ``(steps, B, hidden)`` tensor).
    """
    outs: dict[int, list] = {}
    hooks = [layer.self_attn.o_proj.register_forward_hook(
        lambda m, inp, out, i=i: outs.setdefault(i, []).append(inp[0][:, -1].clone()))
        for i, layer in enumerate(model.model.layers)]
    try:
        cache = PagedKVCache(model.config, policy=policy, page_size=PAGE)
        model(input_ids=ids[:, :prompt], cache=cache, use_cache=True)
        for i in outs:
            outs[i].clear()  # keep decode steps only
        nll, count = 0.0, 0
        for t in range(prompt, ids.shape[1] - 1):
            logits = model(input_ids=ids[:, t: t + 1], cache=cache, use_cache=True).logits[:, -1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[:, t + 1], reduction="sum"))
            count += ids.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return nll, count, {i: torch.stack(v) for i, v in outs.items()}, cache.read_fraction()


def perplexity_rows(windows: int, fractions, mustafar_levels, seqlen: int = PPL_SEQLEN):
    """Rows per (policy, budget): PPL over the decoded half and the attention-output relative error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparseforge.io.builtin import builtin_model_path

    enable()
    path = builtin_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sparseforge").eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = builtin_windows(tok, windows, seqlen)
    prompt = seqlen // 2
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    channels = max(1, head_dim // 4)
    calib = builtin_windows(tok, windows + 4, seqlen)[windows:]  # windows after the measured ones
    labels = calibrate_label_channels(model, [calib], channels=channels)
    rows, dense_out = [], None

    def run(name, label, policy):
        nll, count, outs, read = decode_nll(model, ids, policy, prompt)
        nonlocal dense_out
        if dense_out is None:
            dense_out = outs
        err = [float((outs[i] - dense_out[i]).norm() / dense_out[i].norm()) for i in sorted(outs)]
        rows.append({"policy": name, "budget": label, "ppl": math.exp(nll / count), "tokens": count,
                     "attn_rel_err": sum(err) / len(err), "attn_rel_err_per_layer": err, "read_fraction": read})
        print(f"  ppl {name:<16} {label:<8} {rows[-1]['ppl']:.3f}  attn err {rows[-1]['attn_rel_err']:.4f}", flush=True)

    for name, label, budget, policy in policy_grid(seqlen, fractions, mustafar_levels, labels=labels, channels=channels,
                                                   quest_dense_layers=2, mustafar_recent=64):
        run(name, f"{budget} ({label})" if budget else label, policy)
    return rows


# ---------------------------------------------------------------------------------------------- report
def model_label(mqar_model) -> str:
    """How the tables name the MQAR model: the shipped hand-set circuit (``None``) or the directory given."""
    if mqar_model is None:
        return "`mqar-llama` (hand-set induction circuit, not trained: an upper bound)"
    return f"{mqar_model} (a model directory)"


def fraction_label(fraction: float) -> str:
    """``0.0625`` -> ``"1/16"``; other fractions as ``"%g"``."""
    inverse = 1 / fraction
    return f"1/{round(inverse)}" if fraction < 1 and abs(inverse - round(inverse)) < 1e-9 else f"{fraction:g}"


def recall_table(rows) -> str:
    """Accuracy per (policy, budget) row and context column."""
    rows = [r for r in rows if r["policy"] != "_prefill"]
    contexts = sorted({r["context"] for r in rows})
    keys = list(dict.fromkeys((r["policy"], r["budget"]) for r in rows))
    lines = ["| policy | budget | " + " | ".join(f"{c}" for c in contexts) + " |", "|---|---|" + "---|" * len(contexts)]
    for name, label in keys:
        cells = []
        for c in contexts:
            r = next((r for r in rows if r["context"] == c and r["policy"] == name and r["budget"] == label), None)
            cells.append(f"{r['accuracy']:.3f}" if r else "-")
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ppl_table(rows) -> str:
    lines = ["| policy | budget (tokens) | PPL (decoded half) | attention-output rel. error | read fraction |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['budget']} | {r['ppl']:.3f} | {r['attn_rel_err']:.4f} | {r['read_fraction']:.3f} |")
    return "\n".join(lines)


def verdicts(rows) -> list[str]:
    """Checks: dense recall ~100% per context; where a budget covers the context every policy equals
    dense; below it, query-aware policies (Quest, Double Sparsity) vs StreamingLLM."""
    lines = []
    rows = [r for r in rows if r["policy"] != "_prefill"]
    for c in sorted({r["context"] for r in rows}):
        at = [r for r in rows if r["context"] == c]
        d = next(r for r in at if r["policy"] == "dense")
        lines.append(f"{'PASS' if d['accuracy'] >= 0.98 else 'FAIL'} dense recall at {c}: {d['accuracy']:.3f} (>= 0.98)")
        full = [r for r in at if r.get("budget_tokens") is not None and r["budget_tokens"] >= r["tokens"]]
        if full:
            same = all(r["accuracy"] == d["accuracy"] for r in full)
            lines.append(f"{'PASS' if same else 'FAIL'} every policy with a budget covering the context equals dense at {c}")
        for b in dict.fromkeys(r["budget"] for r in at if r["policy"] == "streaming" and r not in full):
            acc = {r["policy"]: r["accuracy"] for r in at if r["budget"] == b}
            s = acc["streaming"]
            for name in ("quest", "double_sparsity"):
                if name in acc:
                    verdict = "PASS" if acc[name] > s else "FAIL"
                    lines.append(f"{verdict} {name} beats StreamingLLM at {c}, budget {b}: {acc[name]:.3f} vs {s:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="contexts 1K and 2K, 4 examples, fewer budgets")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="MQAR context lengths (default 1K-8K)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="budgets as fractions of the context (default 1/16 1/4)")
    parser.add_argument("--mustafar", type=float, nargs="+", default=None, help="Mustafar sparsities (default 0.7 0.9)")
    parser.add_argument("--examples", type=int, default=None, help="MQAR examples per context (default 8; quick 4)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--ppl-windows", type=int, default=None, help="held-out windows (default 4; quick 2; 0 skips)")
    parser.add_argument("--ppl-seqlen", type=int, default=PPL_SEQLEN,
                        help=f"tokens per window, half prefilled, half decoded (default {PPL_SEQLEN}, the full context)")
    parser.add_argument("--parts", nargs="+", choices=["recall", "ppl"], default=["recall", "ppl"],
                        help="what to measure (default both)")
    parser.add_argument("--mqar-model", default=None,
                        help="an MQAR model directory (default: the shipped hand-set circuit, an upper bound)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    contexts = args.contexts or ([1024, 2048] if quick else [1024, 2048, 4096, 8192])
    fractions = args.fractions or ([1 / 16] if quick else [1 / 16, 1 / 4])
    mustafar_levels = args.mustafar if args.mustafar is not None else ([0.7] if quick else [0.7, 0.9])
    examples = args.examples or (4 if quick else 8)
    windows = args.ppl_windows if args.ppl_windows is not None else (2 if quick else 4)
    for f in fractions:
        if not f > 0:
            parser.error(f"--fractions must be positive (>= 1 reads the whole context), got {f}")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    recall = []
    if "recall" in args.parts:
        recall = recall_rows(load_mqar_model(args.mqar_model), contexts, fractions, mustafar_levels, examples, args.pairs, args.queries)
    ppl = perplexity_rows(windows, fractions, mustafar_levels, args.ppl_seqlen) if windows and "ppl" in args.parts else []
    machine = machine_info(args.threads)
    header = (f"{machine['cpu']}, ISA {machine['isa']}, {args.threads} thread(s), load average {load_before[0]:.1f}, "
              f"{time.perf_counter() - t0:.0f} s")
    text = recall_table(recall) if recall else ""
    if recall:
        print(f"\n### MQAR recall, model {model_label(args.mqar_model)} ({args.pairs} pairs, {args.queries} queries x {examples} examples per context), {header}\n")
        print(text + "\n")
    ptext = ppl_table(ppl) if ppl else ""
    if ppl:
        half = args.ppl_seqlen // 2
        print(f"### built-in model, held-out perplexity at {args.ppl_seqlen} ({half} prefilled + {half} decoded, "
              f"{windows} windows)\n")
        print(ptext + "\n")
    lines = verdicts(recall)
    print("\n".join(lines))
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / ("kv_quality.quick.json" if quick else "kv_quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**machine, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "quick": quick,
            "contexts": contexts, "fractions": fractions, "mustafar": mustafar_levels, "examples": examples,
            "pairs": args.pairs, "queries": args.queries, "ppl_windows": windows,
            "mqar_model": model_label(args.mqar_model) if recall else None,
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "recall": recall, "perplexity": ppl, "recall_table": text,
                               "perplexity_table": ptext, "verdicts": lines}, indent=1) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
