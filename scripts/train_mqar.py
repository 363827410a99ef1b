#!/usr/bin/env python
"""Train the small Llama-style model that solves multi-query associative recall (MQAR).

The gradient-descent route to a shipped MQAR model (``--out`` a directory, loaded with
:func:`sparseforge.evaluation.mqar.load_mqar_model`), the model ``benchmarks/bench_kv_quality.py``
uses to measure how KV-cache policies keep recall at 1K-8K tokens. The task and its generator:
:mod:`sparseforge.data.mqar` (Arora et al., "Zoology", 2023). Without ``--out`` it writes
``src/sparseforge/assets/mqar-llama-trained/``, and only when its held-out recall at 256 tokens
is >= 0.95. Status: at the end of this docstring.

Recipe (the defaults; the model card written next to the weights records the run):

* model: ``transformers.LlamaForCausalLM``, hidden 128, 2 layers, 4 query heads and **2 KV heads**
  (grouped-query attention, so the KV policies' GQA handling is what gets measured), head_dim 32,
  SwiGLU MLP 256, RoPE theta 1e6 (the fastest rotary pair turns 1 rad per token, enough for a
  previous-token head; the slowest turns 2e-6 rad per token, < 0.02 rad over 8K tokens, so a
  content match on the slow pairs does not drift with distance), untied embeddings, vocabulary 145
  (start, 16 filler, 64 keys, 64 values: the benchmark asks 64 pairs);
* data: fresh random batches every step (no epochs), ~4K tokens per step, every query position
  labelled; **filler runs written as ``a b a b ...`` and labelled** (:func:`alternate_filler`):
  predicting them needs a previous-token head, the first half of the induction circuit MQAR needs,
  and this dense signal forms it within a few hundred steps (without it the plain MQAR loss sits on
  the "copy some value from the context" plateau for thousands of steps: see below);
* a context-length curriculum that advances on the model's own progress: 64-128 tokens until the
  training recall over 40 steps is >= 0.9, then 128-512, then 256-1024 with position ids spread by
  a random factor up to 8 in 70% of the batches (``stretch``: the distances of an 8K context on a
  1K sequence; RoPE extrapolation beyond the trained distances is what breaks recall at long
  context otherwise);
* optimiser: AdamW (betas 0.9/0.98, weight decay 0.01 on matrices), LR 2e-3 after 30 warm-up steps,
  cosine to 10% over the last 20% of the steps, grad clip 1, float32, one torch thread.

What did not work (short runs; ~0.2 s of CPU per 4K-token step for this model):

* the issue's recipe (contexts 64-128, 16-63 pairs) and earlier versions of this script (tied
  embeddings, 128 keys, contexts 12-48 at LR 1e-3 to 1e-2, hidden 128 or 256): the loss leaves
  ln(values) within ~100 steps (the model learns which values are in the context: accuracy about
  1/pairs) and then stays there: 0.15-0.55 training accuracy on 2-9 pairs after 700-3200 steps,
  held-out recall at 256 tokens 0.01-0.05;
* a "dictionary" variant (a few keys repeated through the sequence, every repeat labelled) and
  repeated random token strings with a random offset: the same plateau after 400 steps (a fixed
  offset is learnt in 100 steps, by position, and does not transfer);
* with the alternating filler (contexts 96) the accuracy over filler and query labels together rose
  from 0.04 to 0.57 within 350 steps (the filler part: the previous-token head had formed), while
  the query recall was still on the plateau then.

Status: **no run has reached the recall target yet, so no trained model ships** (the benchmark uses
the hand-set circuit of ``scripts/build_mqar_model.py``, an upper bound). The two runs of this
recipe (LR 2e-3 and 3e-3, 2026-12-07) were stopped at steps 480 and 440 of 3000, still in the first
stage: training recall 0.045 on 2-63 pairs, held-out recall at 256 tokens 0.02-0.03. On the shared
2-core machine they got ~4% of a core each (3-15 s per step against 0.2 s of CPU in the first
stage), so they saw ~15K examples, far fewer than the published MQAR recipes (10^5-10^6). Next:
this recipe to its end on an idle core (the first stage ~0.2 s per step, the longer ones more),
then ``load_mqar_model(DIR)`` on its output.

Usage::

    python scripts/train_mqar.py                          # full run (writes the assets if it recalls)
    python scripts/train_mqar.py --steps 300 --lr 3e-3 --out /tmp/mqar-lr3e-3   # a sweep point
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import sparseforge  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparseforge.data.mqar import IGNORE, MQARVocab, make_batch  # noqa: E402

DEFAULT_OUT = REPO / "src" / "sparseforge" / "assets" / "mqar-llama-trained"
SHIP_RECALL = 0.95  # held-out recall at 256 tokens a trained model needs to replace the shipped one

DEFAULTS = dict(
    seed=0, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256, rope_theta=1e6,
    steps=3000, tokens_per_step=4096, lr=2e-3, warmup=30, min_lr_ratio=0.1, decay_fraction=0.2, weight_decay=0.01,
    grad_clip=1.0, threads=1, tie=0, filler=16, keys=64, values=64, max_queries=64, advance_acc=0.9,
    advance_window=40, eval_every=100, save_every=0,
)

# the curriculum: "lo:hi:stretch" stages; a stage ends when the training recall over the last
# ``advance_window`` steps reaches ``advance_acc`` (the last stage runs to the end)
CURRICULUM = "64:128:1,128:512:1,256:1024:8"


def parse_curriculum(text: str) -> tuple:
    """``"64:128:1,256:1024:8"`` -> ``((64, 128, 1.0), (256, 1024, 8.0))``: context range, largest stretch."""
    try:
        stages = tuple((int(lo), int(hi), float(st)) for lo, hi, st in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise SystemExit(f"--curriculum {text!r}: stages 'lo:hi:stretch', comma-separated") from None
    if any(lo > hi or lo < 8 or st < 1 for lo, hi, st in stages):
        raise SystemExit(f"--curriculum {text!r}: each stage needs 8 <= lo <= hi and stretch >= 1")
    return stages


def build_model(args, vocab: MQARVocab):
    """A randomly initialised ``LlamaForCausalLM`` of the recipe's shape (GQA: ``num_kv_heads``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab.size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=16384, rope_theta=args.rope_theta, tie_word_embeddings=bool(args.tie),
        bos_token_id=vocab.bos, eos_token_id=vocab.bos, pad_token_id=vocab.bos,
    )
    config.mqar_vocab = {"filler": vocab.filler, "keys": vocab.keys, "values": vocab.values}
    return LlamaForCausalLM(config)


def alternate_filler(ids: torch.Tensor, labels: torch.Tensor, context: int, vocab: MQARVocab, rng: random.Random):
    """Rewrite every run of filler tokens in the context as ``a b a b ...`` (two random filler ids per run)
    and label each run position whose next token the pattern fixes (``ids[t + 1] == ids[t - 1]``).

    Predicting those tokens needs a previous-token head (attend one step back, copy the token), the
    first half of the induction circuit that MQAR needs; the dense signal on the filler makes that head
    form within a few hundred steps, after which the lookup head can compose with it (K-composition,
    Olsson et al., 2022). Returns new ``(ids, labels)``; the query part is untouched.
    """
    ids, labels = ids.clone(), labels.clone()
    is_filler = ((ids >= 1) & (ids < vocab.first_key))[:, :context].tolist()
    for b, row in enumerate(is_filler):
        t = 0
        while t < context:
            if not row[t]:
                t += 1
                continue
            end = t
            while end < context and row[end]:
                end += 1
            pattern = torch.tensor([rng.randrange(vocab.filler) + 1, rng.randrange(vocab.filler) + 1])
            ids[b, t:end] = pattern.repeat((end - t + 1) // 2)[: end - t]
            labels[b, t + 1: end - 1] = ids[b, t + 2: end]
            t = end
    return ids, labels


def sample_batch(stage: int, args, vocab: MQARVocab, g: torch.Generator, rng: random.Random):
    """One training batch of curriculum ``stage``: context, pairs, filler share and stretch drawn."""
    lo, hi, max_stretch = args.stages[stage]
    context = rng.randint(lo, hi)
    most = min(vocab.keys, (context - 1) // 2)
    pairs = rng.randint(max(2, most // 4), most)  # filler from ~0% to ~75% of the context
    queries = min(pairs, args.max_queries)
    stretch = 1.0 if max_stretch == 1 or rng.random() < 0.3 else rng.uniform(1.0, max_stretch)
    batch = max(2, args.tokens_per_step // (context + 2 * queries))
    b = make_batch(batch, context, pairs, queries, vocab, generator=g, stretch=stretch)
    ids, labels = alternate_filler(b.ids, b.labels, context, vocab, rng)
    return b, ids, labels


def recall_loss(model, ids, labels, positions, context: int):
    """Cross-entropy over every labelled position; accuracy at the query positions (``>= context``)."""
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits  # (B, T, V)
    mask = labels != IGNORE
    loss = F.cross_entropy(logits[mask], labels[mask])
    queries = mask.clone()
    queries[:, :context] = False
    acc = (logits[queries].argmax(-1) == labels[queries]).float().mean().item()
    return loss, acc


@torch.no_grad()
def evaluate(model, vocab: MQARVocab, contexts, pairs: int = 64, queries: int = 32, batch: int = 8, seed: int = 1234):
    """Dense recall accuracy per context length on held-out batches (a fixed seed, random filler)."""
    model.eval()
    out = {}
    for c in contexts:
        p = min(pairs, (c - 1) // 2, vocab.keys)
        b = make_batch(batch if c <= 2048 else 2, c, p, min(queries, p), vocab,
                       generator=torch.Generator().manual_seed(seed + c))
        _, acc = recall_loss(model, b.ids, b.labels, b.positions, b.context)
        out[str(c)] = acc
    model.train()
    return out


def lr_at(step: int, args) -> float:
    """Linear warm-up, constant, then cosine to ``min_lr_ratio`` over the last ``decay_fraction`` of the steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    decay_start = int(args.steps * (1 - args.decay_fraction))
    if step < decay_start:
        return args.lr
    t = (step - decay_start) / max(1, args.steps - decay_start)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    vocab = MQARVocab(filler=args.filler, keys=args.keys, values=args.values)
    model = build_model(args, vocab)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    log, t0, tokens, window, recent, stage, advanced = [], time.time(), 0, [], [], 0, []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        b, ids, labels = sample_batch(stage, args, vocab, g, rng)
        loss, acc = recall_loss(model, ids, labels, b.positions, b.context)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens += ids.numel()
        window.append((loss.item(), acc))
        recent = (recent + [acc])[-args.advance_window:]
        if (stage + 1 < len(args.stages) and len(recent) == args.advance_window
                and sum(recent) / len(recent) >= args.advance_acc):
            stage, recent = stage + 1, []
            advanced.append(step + 1)
            print(json.dumps({"step": step + 1, "stage": stage, "contexts": args.stages[stage][:2]}), flush=True)
        if (step + 1) % 20 == 0 or step + 1 == args.steps:
            ml = sum(x for x, _ in window) / len(window)
            ma = sum(a for _, a in window) / len(window)
            window = []
            entry = {"step": step + 1, "stage": stage, "loss": round(ml, 4), "train_recall": round(ma, 4),
                     "context": b.context, "lr": round(lr_at(step, args), 6), "elapsed_s": round(time.time() - t0, 1)}
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                entry["eval_acc"] = {k: round(v, 4) for k, v in evaluate(model, vocab, (256, 1024)).items()}
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if (args.save_every and not args.no_save and args.out.resolve() != DEFAULT_OUT.resolve()
                and (step + 1) % args.save_every == 0 and step + 1 < args.steps):
            partial = {"model": model, "log": log, "elapsed_s": time.time() - t0, "tokens": tokens,
                       "final_eval": evaluate(model, vocab, (256, 1024)), "steps_done": step + 1, "advanced": advanced}
            save(partial, args, args.out)  # a checkpoint to fall back on (never over the shipped model)
    elapsed = time.time() - t0
    final = evaluate(model, vocab, args.final_contexts)
    print(json.dumps({"final_eval_acc": final, "elapsed_s": round(elapsed, 1), "tokens": tokens}), flush=True)
    return {"model": model, "log": log, "elapsed_s": elapsed, "tokens": tokens, "final_eval": final,
            "steps_done": args.steps, "advanced": advanced}


CARD = """# MQAR recall model (`mqar-llama-trained`)

A {num_layers}-layer Llama-style model **trained from scratch** by gradient descent on multi-query
associative recall (`sparseforge.data.mqar`; Arora et al., "Zoology", 2023), the model
`benchmarks/bench_kv_quality.py` measures KV-cache policies with at 1K-8K tokens (no retraining).
Load it with `sparseforge.evaluation.mqar.load_mqar_model()`.

## Architecture
`transformers.LlamaForCausalLM`, float32: hidden {hidden_size}, {num_layers} layers, {num_heads} query heads and
{num_kv_heads} KV heads (GQA, head_dim {head_dim}), SwiGLU MLP {intermediate_size}, RoPE theta {rope_theta:g},
{tied} embeddings, vocabulary {vocab_size} (id 0 start, {filler} filler ids, {keys} key ids, {values} value ids).
**{params:,} parameters.**

## Training (`scripts/train_mqar.py`, its docstring explains the recipe)
Seed {seed}; {steps_done} steps of fresh random batches (~{tokens_per_step} tokens each, {tokens:,} tokens in all);
context-length curriculum {stages}, each stage entered when the training recall over the last
{advance_window} steps reached {advance_acc} (at steps {advanced}); filler runs written as `a b a b ...`
and labelled; pairs per example between a quarter of the most that fit and the most, up to
{max_queries} queries per example, each labelled; AdamW (betas 0.9/0.98, weight decay {weight_decay} on
matrices), LR {lr:g} after {warmup} warm-up steps, cosine to {min_lr:g} over the last {decay_pct:.0%} of the
steps; grad clip {grad_clip}; float32; torch threads: {threads}.
{elapsed_min:.1f} min on {cpu} ({note}).

## Held-out recall (dense attention, one forward pass; 64 pairs and 32 queries; 8 examples per context up to 2048, 2 above)
{final}

## Reproduce
```
python scripts/train_mqar.py
```
"""


def write_model_dir(out: Path, model, files: dict) -> None:
    """``model.save_pretrained`` + ``files`` (name -> text) into a temporary directory, renamed to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for name, text in files.items():
            (tmp / name).write_text(text)
        tmp.chmod(0o755)  # mkdtemp makes it private; the assets are package data
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(result: dict, args, out: Path) -> None:
    """The trained model, its card and the training log into ``out`` (:func:`write_model_dir`)."""
    model = result["model"]
    cfg = model.config
    card = CARD.format(
        hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, filler=args.filler, keys=args.keys, values=args.values,
        rope_theta=args.rope_theta, tied="tied" if args.tie else "untied", vocab_size=cfg.vocab_size,
        params=sum(p.numel() for p in model.parameters()), seed=args.seed,
        steps_done=result["steps_done"], tokens_per_step=args.tokens_per_step, tokens=result["tokens"],
        stages=", ".join(f"{lo}-{hi} tokens (position stretch up to {st:g})" for lo, hi, st in args.stages),
        advance_window=args.advance_window, advance_acc=args.advance_acc,
        advanced=", ".join(map(str, result["advanced"])) or "none",
        max_queries=args.max_queries, weight_decay=args.weight_decay, lr=args.lr, warmup=args.warmup,
        min_lr=args.lr * args.min_lr_ratio, decay_pct=args.decay_fraction, grad_clip=args.grad_clip,
        threads=args.threads, elapsed_min=result["elapsed_s"] / 60, cpu=platform.processor() or platform.machine(),
        note=args.note, final="\n".join(f"- context {c}: {a:.3f}" for c, a in result["final_eval"].items()),
    )
    run = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "log": result["log"],
           "final_eval": result["final_eval"]}
    write_model_dir(out, model, {"README.md": card, "training_log.json": json.dumps(run, indent=1)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the model goes (default: the package assets)")
    p.add_argument("--no-save", action="store_true", help="train and evaluate only (a sweep point)")
    p.add_argument("--note", default="a shared, loaded 2-core machine, nice 19", help="the conditions, for the card")
    p.add_argument("--final-contexts", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192],
                   help="context lengths of the final held-out recall (the first must be 256 to write the assets)")
    p.add_argument("--curriculum", default=CURRICULUM, help=f"context-length stages (default {CURRICULUM})")
    args = p.parse_args(argv)
    args.stages = parse_curriculum(args.curriculum)
    result = train(args)
    if args.no_save:
        return 0
    if args.out.resolve() == DEFAULT_OUT.resolve() and result["final_eval"].get("256", 0.0) < SHIP_RECALL:
        print(f"recall at 256 tokens {result['final_eval'].get('256', 0.0):.3f} < {SHIP_RECALL}: the shipped model "
              f"({DEFAULT_OUT}) is kept; pass --out to write this one elsewhere", file=sys.stderr)
        return 1
    save(result, args, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
