#!/usr/bin/env python
"""Train the small Llama-style model that solves multi-query associative recall (MQAR).

The gradient-descent route to ``src/sparseforge/assets/mqar-llama/`` (loaded by
:func:`sparseforge.evaluation.mqar.load_mqar_model`), the model ``benchmarks/bench_kv_quality.py``
uses to measure how KV-cache policies keep recall at 1K-8K tokens. The task and its generator:
:mod:`sparseforge.data.mqar` (Arora et al., "Zoology", 2023). **No run has reached the recall
target yet** (Status below), so the shipped model is the hand-set induction circuit of
``scripts/build_mqar_model.py``; this script writes the package asset only when its held-out
recall at 256 tokens is >= 0.95 (``--out`` writes anywhere).

Recipe (the defaults; the model card written next to the weights records the run):

* model: ``transformers.LlamaForCausalLM``, hidden 128, 2 layers, 4 heads of 32, MLP 256, RoPE
  with theta 1e6 (slow channels stay near-constant out to 8K+, so the content match of the recall
  head does not drift with distance), **tied embeddings** (copying a value to the output is then the
  identity), vocabulary 289 (start, 32 filler, 128 keys, 128 values);
* data: fresh random batches every step (no epochs), ~4K tokens per step, every query position
  carries a label; a curriculum on the context length: **half the steps at 16-48 tokens** (2-23
  pairs: with few candidates the gradient toward the right pair is strong), then 48-256, then
  256-512, with the filler share and the number of pairs drawn per batch; from the second stage
  on, position ids are spread by a random factor up to 16 (``stretch``) in 70% of the batches so
  the model sees the distances of 1K-8K contexts;
* optimiser: AdamW (betas 0.9/0.98, weight decay 0.01 on matrices), peak LR 3e-3, 30 warm-up
  steps, cosine decay to 10%, grad clip 1, float32, one torch thread.

What did not work (short runs, same model otherwise):

* untied embeddings, contexts 64-128 with 16-63 pairs from the first step (the issue's failed
  recipe, with more pairs): the loss stayed at ln(128), chance among the values, for 160 steps of
  8K tokens at LR 3e-3 and at 1e-2;
* tied embeddings with contexts 16-64 left that plateau within 40 steps at both rates (first the
  "copy a value from the context" stage, accuracy ~1/pairs); LR 3e-3 beat 1e-2 (loss 3.56 vs 4.22
  after 100 steps), so 3e-3 is the default;
* moving on to 48-256 tokens after 110 steps, before the induction step had formed (training
  accuracy ~15%, the copy stage), sent the loss back to chance: the short-context stage must last
  until the training accuracy there is near 1.

Status: **the recipe does not reach the target yet**. Earlier runs (this script at 3-10% of one
core under nice 19): contexts 12-32 at LR 2e-3 for 500 steps (~2M tokens) climbed to 35-45% training
accuracy and stayed there (above the ~1/pairs of copying any value from the context, far below the
~100% of an induction circuit); moving on to 48-256 tokens then dropped it to chance again.

Runs of one short stage, constant LR after warm-up, vocabulary ``--filler 16 --keys 64 --values 64``
(two runs at a time, one torch thread each, on the shared 2-core machine; 0.1-0.6 s per step):

==========================  ===========  ===========  ==========  =====  ============================
model                       contexts     tokens/step  LR          steps  training accuracy
==========================  ===========  ===========  ==========  =====  ============================
hidden 128, 4 heads         24-64        4096         1e-3        720    0.20
hidden 128, 4 heads         16-48        1024         2e-3        2000   0.15-0.17 (copy stage)
hidden 128, 4 heads         9-20         1024         3e-3        1500   0.30 (copy stage)
same, RoPE theta 1e4        9-20         1024         3e-3        3200   0.31
hidden 256, 8 heads         9-20         1024         2e-3        680    0.29
hidden 256, 8 heads         9-20         1024         1e-3        3000   0.50-0.55 (plateau from ~1200)
hidden 256, 8 heads         9-20         1024         5e-4        1500   0.45-0.55
==========================  ===========  ===========  ==========  =====  ============================

(9-20 tokens hold 2-9 pairs.) Wider and slower learns faster: hidden 256 at LR 1e-3 or 5e-4 gets
past the copy stage (~0.3 with 2-9 pairs) to ~0.5, still far from ~1.0, and held-out recall at 256/1024 tokens
(64 pairs) stays at 0.01-0.05. The pipeline itself is right: the shipped hand-set model scores loss
0 and accuracy 1.0 on this script's training batches. Next to try, with more compute than the
shared 2-core machine gives: hidden 256 / 8 heads at LR 5e-4 for 10K+ steps on 9-20 tokens until
training accuracy is ~1, then the longer stages (with ``stretch``); a GPU is the better place for
that sweep. Length generalisation of a trained model is untested.

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
from sparseforge.evaluation.mqar import MQAR_MODEL_DIRNAME  # noqa: E402

DEFAULT_OUT = REPO / "src" / "sparseforge" / "assets" / MQAR_MODEL_DIRNAME
SHIP_RECALL = 0.95  # held-out recall at 256 tokens a trained model needs to replace the shipped one

DEFAULTS = dict(
    seed=0, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, rope_theta=1e6,
    steps=500, tokens_per_step=4096, lr=3e-3, warmup=30, min_lr_ratio=0.1, weight_decay=0.01,
    grad_clip=1.0, threads=1, tie=1, filler=32, keys=128, values=128, max_queries=64, max_stretch=16.0, eval_every=100, save_every=0,
)

# the curriculum: "end:lo:hi" stages, each up to a fraction of the steps, context lengths drawn in [lo, hi]
CURRICULUM = "0.5:16:48,0.75:48:256,1:256:512"


def parse_curriculum(text: str) -> tuple:
    """``"0.25:64:128,1:128:512"`` -> ``((0.25, 64, 128), (1.0, 128, 512))``."""
    stages = tuple((float(e), int(lo), int(hi)) for e, lo, hi in (part.split(":") for part in text.split(",")))
    if stages[-1][0] != 1.0 or any(lo > hi or lo < 8 for _, lo, hi in stages):
        raise SystemExit(f"--curriculum {text!r}: stages 'end:lo:hi', the last ending at 1, 8 <= lo <= hi")
    return stages


def build_model(args, vocab: MQARVocab):
    """A randomly initialised ``LlamaForCausalLM`` of the recipe's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab.size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads,
        max_position_embeddings=16384, rope_theta=args.rope_theta, tie_word_embeddings=bool(args.tie),
        bos_token_id=vocab.bos, eos_token_id=vocab.bos, pad_token_id=vocab.bos,
    )
    config.mqar_vocab = {"filler": vocab.filler, "keys": vocab.keys, "values": vocab.values}
    return LlamaForCausalLM(config)


def sample_batch(step: int, args, vocab: MQARVocab, g: torch.Generator, rng: random.Random):
    """One training batch of the curriculum stage of ``step``: context, pairs, filler and stretch drawn."""
    frac = step / args.steps
    stage = next(i for i, (end, _, _) in enumerate(args.stages) if frac < end or end == 1.0)
    _, lo, hi = args.stages[stage]
    context = rng.randint(lo, hi)
    most = min(vocab.keys, (context - 1) // 2)
    pairs = rng.randint(max(2, most // 4), most)  # filler from ~0% to ~75% of the context
    queries = min(pairs, args.max_queries)
    stretch = 1.0 if stage == 0 or rng.random() < 0.3 else rng.uniform(1.0, args.max_stretch)
    batch = max(2, args.tokens_per_step // (context + 2 * queries))
    return make_batch(batch, context, pairs, queries, vocab, generator=g, stretch=stretch)


def recall_loss(model, b):
    """Cross-entropy and accuracy at the query positions (logits at a query key predict its value)."""
    logits = model(input_ids=b.ids, position_ids=b.positions, use_cache=False).logits  # (B, T, V)
    mask = b.labels != IGNORE
    picked = logits[mask]  # (N, V)
    target = b.labels[mask]
    return F.cross_entropy(picked, target), (picked.argmax(-1) == target).float().mean().item()


@torch.no_grad()
def evaluate(model, vocab: MQARVocab, contexts, pairs: int = 64, queries: int = 32, batch: int = 8, seed: int = 1234):
    """Dense recall accuracy per context length on held-out batches (a fixed seed)."""
    model.eval()
    out = {}
    for c in contexts:
        p = min(pairs, (c - 1) // 2, vocab.keys)
        b = make_batch(batch, c, p, min(queries, p), vocab,
                       generator=torch.Generator().manual_seed(seed + c))
        _, acc = recall_loss(model, b)
        out[str(c)] = acc
    model.train()
    return out


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
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
    log, t0, tokens, window = [], time.time(), 0, []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        b = sample_batch(step, args, vocab, g, rng)
        loss, acc = recall_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens += b.ids.numel()
        window.append((loss.item(), acc))
        if (step + 1) % 20 == 0 or step + 1 == args.steps:
            ml = sum(x for x, _ in window) / len(window)
            ma = sum(a for _, a in window) / len(window)
            window = []
            entry = {"step": step + 1, "loss": round(ml, 4), "train_acc": round(ma, 4), "context": b.context,
                     "lr": round(lr_at(step, args), 6), "elapsed_s": round(time.time() - t0, 1)}
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                entry["eval_acc"] = {k: round(v, 4) for k, v in evaluate(model, vocab, (256, 1024)).items()}
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if (args.save_every and not args.no_save and args.out.resolve() != DEFAULT_OUT.resolve()
                and (step + 1) % args.save_every == 0 and step + 1 < args.steps):
            partial = {"model": model, "log": log, "elapsed_s": time.time() - t0, "tokens": tokens,
                       "final_eval": evaluate(model, vocab, (256, 1024)), "steps_done": step + 1}
            save(partial, args, args.out)  # a checkpoint to fall back on (never over the shipped model)
    elapsed = time.time() - t0
    final = evaluate(model, vocab, (256, 1024, 2048))
    print(json.dumps({"final_eval_acc": final, "elapsed_s": round(elapsed, 1), "tokens": tokens}), flush=True)
    return {"model": model, "log": log, "elapsed_s": elapsed, "tokens": tokens, "final_eval": final, "steps_done": args.steps}


CARD = """# MQAR recall model (`mqar-llama`)

A 2-layer Llama-style model trained from scratch on multi-query associative recall
(`sparseforge.data.mqar`; Arora et al., "Zoology", 2023), shipped so `benchmarks/bench_kv_quality.py`
measures how each KV-cache policy keeps recall at 1K-8K tokens without retraining.
Load it with `sparseforge.evaluation.mqar.load_mqar_model()`.

## Architecture
`transformers.LlamaForCausalLM`, float32: hidden {hidden_size}, {num_layers} layers, {num_heads} heads
(head_dim {head_dim}, no GQA), SwiGLU MLP {intermediate_size}, RoPE theta {rope_theta:g}, {tied} embeddings,
vocabulary {vocab_size} (id 0 start, {filler} filler ids, {keys} key ids, {values} value ids). **{params:,} parameters.**

## Training
Seed {seed}; {steps_done} of {steps} steps of fresh random batches (~{tokens_per_step} tokens each, {tokens:,} tokens in all);
curriculum on the context length {stages}; pairs per example drawn between a quarter of the
most that fit and the most (filler 0-75%), up to {max_queries} queries per example, each labelled;
position ids spread by a random factor up to {max_stretch:g} in 70% of the batches;
AdamW (betas 0.9/0.98, weight decay {weight_decay} on matrices), peak LR {lr:g}, {warmup} warm-up steps,
cosine to {min_lr:g}; grad clip {grad_clip}; float32; torch threads: {threads}.
{elapsed_min:.1f} min on {cpu} ({note}).

## Held-out recall (dense attention, 64 pairs and 32 queries, 8 examples per context)
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
        head_dim=cfg.hidden_size // cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        filler=args.filler, keys=args.keys, values=args.values,
        rope_theta=args.rope_theta, tied="tied" if args.tie else "untied", vocab_size=cfg.vocab_size,
        params=sum(p.numel() for p in model.parameters()), seed=args.seed, steps=args.steps,
        steps_done=result["steps_done"], tokens_per_step=args.tokens_per_step, tokens=result["tokens"],
        stages=", ".join(f"{lo}-{hi} tokens up to {end:.0%} of the steps" for end, lo, hi in args.stages),
        max_queries=args.max_queries, max_stretch=args.max_stretch, weight_decay=args.weight_decay, lr=args.lr,
        warmup=args.warmup, min_lr=args.lr * args.min_lr_ratio, grad_clip=args.grad_clip, threads=args.threads,
        elapsed_min=result["elapsed_s"] / 60, cpu=platform.processor() or platform.machine(), note=args.note,
        final="\n".join(f"- context {c}: {a:.3f}" for c, a in result["final_eval"].items()),
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
    p.add_argument("--curriculum", default=CURRICULUM, help=f"context-length stages (default {CURRICULUM})")
    args = p.parse_args(argv)
    args.stages = parse_curriculum(args.curriculum)
    result = train(args)
    if args.no_save:
        return 0
    if args.out.resolve() == DEFAULT_OUT.resolve() and result["final_eval"]["256"] < SHIP_RECALL:
        print(f"recall at 256 tokens {result['final_eval']['256']:.3f} < {SHIP_RECALL}: the shipped model "
              f"({DEFAULT_OUT}) is kept; pass --out to write this one elsewhere", file=sys.stderr)
        return 1
    save(result, args, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
