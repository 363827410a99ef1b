"""``sparseforge finetune``: recover a pruned model's accuracy by fine-tuning that keeps its mask.

The student is a pruned model (``sparseforge prune`` output, or any model directory with pruned
linear layers); the teacher is the dense model it came from. The run prints its settings, a
progress bar (loss, tokens/s), the held-out evaluation before and after (perplexity for causal
LMs, embedding cosine to the teacher for encoders), and writes a compressed checkpoint to
``--out`` atomically. While it runs, its resumable state lives in ``--resume-dir`` (default: a
hidden directory next to ``--out``); after an interruption the same command continues from the
last saved step; the state is deleted once the output is written.

Example::

    sparseforge prune builtin --method sparsegpt --sparsity 0.7 --out pruned/
    sparseforge finetune pruned/ --teacher builtin --loss squarehead --steps 200 --out recovered/
    sparseforge finetune pruned/ --teacher builtin --loss ce=1,squarehead=1 --data notes.txt --out recovered/
    sparseforge finetune pruned/ --loss ce --adapter s2ft --s2ft-budget 0.01 --lr 1e-3 --out tuned/
    sparseforge finetune pruned/ --loss ce --adapter sparselora --lr 1e-3 --steps 200 --out tuned/

Wiring (in ``sparseforge/cli.py``): ``add_parser(subparsers)`` adds the subcommand (torch-free) and
``run(args)`` runs it, returning the exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from sparseforge.finetune.s2ft_options import add_s2ft_arguments, s2ft_kwargs
from sparseforge.finetune.adapter_options import adapter_kwargs, add_adapter_arguments
from sparseforge.finetune.config import FinetuneConfig

__all__ = ["add_parser", "run"]

#: the recipe defaults, read from FinetuneConfig (torch-free) so the CLI and the API agree
_DEFAULT = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name in ("loss", "steps", "lr")}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("finetune", help="recovery fine-tuning of a pruned model that keeps its mask (SquareHead, KD, CE)")
    p.add_argument("model", help="the pruned student: a directory saved by 'sparseforge prune', or any model with pruned layers")
    p.add_argument("--teacher", default=None, help="the dense model ('builtin', 'minilm' or a directory); needed by kd and squarehead")
    p.add_argument("--loss", default=_DEFAULT["loss"],
                   help=f"ce, kd, squarehead or a weighted mix: 'ce+squarehead', 'ce=1,kd=0.5' (default {_DEFAULT['loss']})")
    p.add_argument("--steps", type=int, default=_DEFAULT["steps"], help=f"optimizer steps (default {_DEFAULT['steps']})")
    p.add_argument("--data", default="builtin", help="training text: 'builtin' corpus, a .txt file or a directory of them")
    p.add_argument("--out", type=Path, required=True, help="output directory (compressed checkpoint)")
    p.add_argument("--lr", type=float, default=_DEFAULT["lr"], help=f"peak AdamW learning rate (default {_DEFAULT['lr']:g})")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 10%% of --steps)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128, help="tokens per training sequence (encoders: max tokens per sentence)")
    p.add_argument("--temperature", type=float, default=1.0, help="logit-distillation temperature")
    p.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compute", default="dense", choices=["dense", "csr", "bitmap"],
                   help="dense: masked dense weights (default); csr / bitmap: the pruned layers train on the sparse kernels")
    p.add_argument("--min-sparsity", type=float, default=0.1, help="a linear layer with at least this fraction of zeros keeps them")
    p.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the student's dropout while it trains (default off: distillation matches the teacher)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume-dir", type=Path, default=None, help="resumable state (default: .<out>.finetune-state next to --out)")
    p.add_argument("--save-every", type=int, default=50, help="save the resumable state every N steps")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity (causal LMs)")
    p.add_argument("--eval-sentences", type=int, default=256, help="held-out sentences for embedding cosine (encoders)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True, help="held-out evaluation before and after")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False, help="replace an existing --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    add_adapter_arguments(p)
    add_s2ft_arguments(p)
    return p


def default_resume_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name or 'out'}.finetune-state"


def run(args: argparse.Namespace) -> int:
    """Run the ``finetune`` subcommand; returns the exit status (errors raise ``SparseforgeError``)."""
    import torch

    from sparseforge.errors import ConfigError
    from sparseforge.finetune.config import FinetuneConfig
    from sparseforge.finetune.loop import STATE_FILE, finetune_
    from sparseforge.io.models import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = FinetuneConfig(loss=args.loss, steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
                            batch_size=args.batch_size, seqlen=args.seqlen, temperature=args.temperature,
                            teacher_dtype=args.teacher_dtype, min_sparsity=args.min_sparsity, seed=args.seed,
                            save_every=args.save_every, eval_windows=args.eval_windows, eval_sentences=args.eval_sentences,
                            compute=args.compute, dropout=args.dropout, **adapter_kwargs(args), **s2ft_kwargs(args))
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        raise ConfigError(f"output {args.out} already exists; pass --overwrite or choose another --out")
    if config.needs_teacher and args.teacher is None:
        raise ConfigError(f"loss {config.loss} distils from a teacher; pass --teacher DENSE (the model before pruning)")
    if args.data != "builtin" and not Path(args.data).expanduser().exists():
        raise ConfigError(f"--data {args.data} does not exist; give 'builtin', a UTF-8 .txt file or a directory of them")
    print("# finetune settings: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()), flush=True)
    student = load_model(args.model)
    teacher = load_model(args.teacher) if args.teacher is not None else None
    resume_dir = args.resume_dir or default_resume_dir(args.out)
    result = finetune_(student, config, teacher=teacher, data=args.data, resume_dir=resume_dir, out=args.out,
                       overwrite=args.overwrite, evaluate=args.eval, progress=args.progress)
    (resume_dir / STATE_FILE).unlink(missing_ok=True)  # the output is written: nothing left to resume
    try:
        resume_dir.rmdir()
    except OSError:
        pass  # not empty: it holds files of the user's
    print(result.format())
    return 0
