"""``sparseforge train``: run a sparse-training recipe on a causal LM (default: the built-in model and corpus).

Fine-tunes a causal LM (the model argument: ``builtin``, :mod:`sparseforge.io.builtin`, by default, or
a Hugging Face model directory) on ``--data`` (default: the training split of the built-in corpus,
:mod:`sparseforge.data.corpus`, tokenised by :func:`sparseforge.data.calibration.corpus_token_ids`;
or a ``.txt`` file or a directory of them) with any training method (GMP, SET, RigL, SRigL, sparse
momentum, STE / SR-STE / S-STE), prints the held-out perplexity
(:func:`sparseforge.evaluation.quality.perplexity`) before and after and the final per-layer
sparsities, and saves a checkpoint (:func:`sparseforge.io.checkpoint.save_pretrained`)
with ``--output``. The recipe is the YAML of :func:`sparseforge.train.load_train_recipe`; without
``--recipe`` one is built from ``--method`` / ``--sparsity`` / ``--pattern`` with a schedule
scaled to ``--steps`` (GMP prunes over the first 60 %, DST updates masks until 75 %), and printed
so the run can be repeated. The default budget (60 steps of 4 x 128 tokens, 8 evaluation
windows, 1 thread) took 80 s end to end on the shared 2-core machine.

Example::

    sparseforge train --method gmp --sparsity 0.5 --steps 60 --output trained/
    sparseforge train --recipe rigl.yaml --steps 200
    sparseforge train path/to/llama-dir --data notes.txt --method rigl --sparsity 0.8

Wiring: :func:`sparseforge.cli.add_train_parser` declares the options (torch-free, so that
``sparseforge --help`` stays fast) and ``run(args)`` here runs them, returning the exit status; this
module never imports the CLI.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

__all__ = ["run", "default_config"]

DEFAULT_TARGETS = ["model.layers.*"]  # the transformer blocks (the LM head is tied to the embedding)


def default_config(method: str, steps: int, sparsity: float | None = None, pattern: str | None = None,
                   targets: list[str] | None = None):
    """The config of ``method`` with a schedule scaled to ``steps`` (see the module doc); ``targets``
    defaults to the built-in model's transformer blocks."""
    from sparseforge.errors import ConfigError
    from sparseforge.patterns import FanIn, parse
    from sparseforge.train.config import TRAIN_CONFIGS, SparseTrainConfig

    if method not in TRAIN_CONFIGS:
        raise ConfigError(f"unknown training method {method!r}; choose one of {', '.join(TRAIN_CONFIGS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"--steps must be an integer >= 2, got {steps!r}")
    fields = {"method": method, "targets": list(targets or DEFAULT_TARGETS)}
    if pattern is not None:
        fields["pattern"] = pattern
    if method in ("ste", "srste", "sste"):
        if sparsity is not None:
            fields["sparsity"] = sparsity
        return SparseTrainConfig.from_dict(fields)
    parsed = parse(pattern) if pattern is not None else None  # ConfigError naming the valid forms
    fixed = parsed is not None and (parsed.sparsity is not None or (isinstance(parsed, FanIn) and parsed.k is not None))
    if sparsity is not None:
        fields["sparsity"] = sparsity  # the config says so when the pattern fixes it
    elif not fixed:
        fields["sparsity"] = 0.5
    interval = max(1, steps // 10)
    if method == "gmp":
        end = max(interval, interval * round(0.6 * steps / interval))
        fields["schedule"] = {"start_step": 0, "end_step": end, "update_interval": interval}
    elif method != "static":
        fields["schedule"] = {"start_step": 0, "end_step": max(interval + 1, int(0.75 * steps)), "update_interval": interval}
    return SparseTrainConfig.from_dict(fields)


def run(args: argparse.Namespace) -> int:
    """Run the ``train`` subcommand; returns the exit status (errors raise ``SparseforgeError``)."""
    import torch
    from tqdm.auto import tqdm

    from sparseforge.data import calibration as data
    from sparseforge.errors import ConfigError
    from sparseforge.evaluation.quality import perplexity
    from sparseforge.io import checkpoint
    from sparseforge.io.models import load_model
    from sparseforge.train import dump_train_recipe, from_config, load_train_recipe
    from sparseforge.io.writable import check_output_dir

    for name in ("batch_size", "seqlen", "eval_windows", "threads"):
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ConfigError(f"--lr (the AdamW learning rate) must be a finite positive number, got {args.lr}")
    if args.output is not None:
        check_output_dir(args.output, overwrite=args.overwrite, option="--output")
    config = load_train_recipe(args.recipe) if args.recipe is not None else default_config(
        args.method, args.steps, args.sparsity, args.pattern)
    torch.set_num_threads(args.threads)
    loaded = load_model(getattr(args, "model", "builtin"))
    if loaded.kind != "causal-lm":
        raise ConfigError(f"sparseforge train trains causal LMs with next-token loss; {loaded.path} is an {loaded.kind}: "
                          "prune it (sparseforge prune) and recover with sparseforge finetune --loss squarehead")
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.recipe is None:  # the transformer blocks of this model (the LM head is often tied to the embedding)
        from sparseforge.layers import find_blocks

        config = default_config(args.method, args.steps, args.sparsity, args.pattern, [f"{find_blocks(model)[0]}.*"])
    print("# resolved training recipe (repeat with --recipe FILE)\n" + dump_train_recipe(config), flush=True)
    source = getattr(args, "data", "builtin")
    train_ids = (data.corpus_token_ids(tokenizer, "train") if str(source) == "builtin"
                 else data.encode(tokenizer, data.source_text(source)))  # (n_tokens,)
    heldout = data.corpus_token_ids(tokenizer, "heldout")  # (n_tokens,)
    if train_ids.numel() <= args.seqlen + 1:
        raise ConfigError(f"--seqlen {args.seqlen} is longer than the training text ({train_ids.numel()} tokens); "
                          "lower --seqlen or give more text")

    def ppl() -> float:
        return perplexity(model, tokenizer, token_ids=heldout, seqlen=128, max_windows=args.eval_windows,
                          progress=False).ppl

    before = ppl()
    print(f"held-out perplexity before: {before:.3f}", flush=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    trainer = from_config(model, opt, config)
    gen = torch.Generator().manual_seed(args.seed)
    updates = 0
    with tqdm(range(args.steps), desc=f"train {config.method}", unit="step", disable=not args.progress) as bar:
        for _ in bar:
            starts = torch.randint(0, train_ids.numel() - args.seqlen, (args.batch_size,), generator=gen)
            x = train_ids[starts[:, None] + torch.arange(args.seqlen)]  # (batch, seqlen)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            updates += trainer.step() is not None
            bar.set_postfix(loss=f"{loss.item():.3f}")
    sparsities = trainer.sparsities()
    if hasattr(trainer, "finalize"):
        trainer.finalize()  # N:M trainers: write W * mask into plain weights
    else:
        trainer.remove()  # mask buffers off; the pruned weights stay exactly zero
    model.eval()
    after = ppl()
    print(f"held-out perplexity after {args.steps} steps ({updates} mask updates): {after:.3f} (before {before:.3f})")
    print("final sparsity per layer:")
    for name, value in sparsities.items():
        print(f"  {name}: {value:.4f}")
    total = sum(m.weight.numel() for n, m in model.named_modules() if n in sparsities)
    zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules() if n in sparsities)
    print(f"overall sparsity of the {len(sparsities)} trained layers: {zeros / total:.4f}")
    if args.output is not None:
        out = checkpoint.save_pretrained(
            model, args.output, tokenizer=tokenizer, overwrite=args.overwrite,
            sparsity_config={"method": config.method, "pattern": config.pattern, "sparsity": config.sparsity,
                             "targets": [f"{n}.weight" for n in sparsities], "training_recipe": config.to_dict()},
        )
        print(f"saved {out}")
    return 0
