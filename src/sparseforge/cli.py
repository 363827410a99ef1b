"""The ``sparseforge`` command line: a thin layer over the public API.

Subcommands: ``prune``, ``eval``, ``inspect``, ``demo``. Every run prints its resolved config as a
YAML recipe so it can be repeated with ``--recipe``. Errors print one line and exit with status 2.

Example::

    sparseforge prune builtin --method sparsegpt --pattern 2:4 --out pruned/
    sparseforge eval pruned/
    sparseforge inspect pruned/
    python -m sparseforge demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparseforge.errors import SparseforgeError

__all__ = ["main", "build_parser"]


def _add_prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", type=Path, help="YAML recipe; its stages replace --method/--pattern/... below")
    p.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--pattern", default="unstructured", help="unstructured, N:M (2:4), blockHxW, fanin, channel")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of zeros in [0, 1) (default 0.5; N:M fixes it)")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "owl"], help="per-layer sparsity allocation")
    p.add_argument("--targets", nargs="+", default=None, metavar="GLOB", help="layers to prune (default: linears in the transformer blocks)")
    p.add_argument("--ignore", nargs="+", default=[], metavar="GLOB", help="layers never pruned")
    p.add_argument("--blocksize", type=int, default=None, help="SparseGPT column block size (default 128)")
    p.add_argument("--dampening", type=float, default=None, help="SparseGPT Hessian dampening, fraction of mean diag (default 0.01)")
    p.add_argument("--calibration-data", default="builtin", help="'builtin' corpus, a .txt file or a directory of them")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseforge", description="Make neural networks sparse and measurably faster.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="one-shot prune a model and save it")
    p.add_argument("model", help="'builtin', 'minilm', or a Hugging Face model directory")
    _add_prune_options(p)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--compressed", action=argparse.BooleanOptionalAction, default=True, help="save packed sparse weights (default) or a plain dense checkpoint")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False, help="replace an existing output directory")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True, help="evaluate dense and pruned model")
    p.add_argument("--dtype", default=None, help="load the model in float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    p = sub.add_parser("eval", help="perplexity (causal LMs) or embedding fidelity against --reference (encoders)")
    p.add_argument("model")
    p.add_argument("--reference", default=None, help="dense model to compare an encoder's embeddings against")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    p = sub.add_parser("inspect", help="per-layer sparsity, pattern validity and sizes of a checkpoint")
    p.add_argument("path", type=Path)

    p = sub.add_parser("demo", help="prune the built-in model three ways, evaluate, save, reload")
    p.add_argument("--out", type=Path, default=Path("sparseforge-demo"), help="where the demo writes its checkpoint")
    p.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"], help="patterns to compare")
    p.add_argument("--sparsity", type=float, default=None)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def config_from_args(args: argparse.Namespace):
    """The list of SparsifyConfig stages the arguments describe (a recipe, or one stage)."""
    from sparseforge.config import CalibrationConfig, SparsifyConfig, load_recipe

    if getattr(args, "recipe", None) is not None:
        return load_recipe(args.recipe)
    options = {}
    if getattr(args, "blocksize", None) is not None:
        options["blocksize"] = args.blocksize
    if getattr(args, "dampening", None) is not None:
        options["dampening"] = args.dampening
    return [
        SparsifyConfig(
            method=getattr(args, "method", "sparsegpt"),
            pattern=args.pattern,
            sparsity=args.sparsity,
            targets=getattr(args, "targets", None),
            ignore=list(getattr(args, "ignore", [])),
            allocation=getattr(args, "allocation", "uniform"),
            method_options=options,
            calibration=CalibrationConfig(
                source=args.calibration_data, samples=args.samples, seqlen=args.seqlen, seed=args.seed
            ),
        )
    ]


def _cmd_prune(args) -> int:
    from sparseforge.config import dump_recipe
    from sparseforge.pipeline import prune_model

    configs = config_from_args(args)
    print("# resolved recipe (repeat with --recipe FILE)\n" + dump_recipe(configs), flush=True)
    result = prune_model(
        args.model, configs, out=args.out, compressed=args.compressed, overwrite=args.overwrite,
        evaluate=args.eval, dtype=args.dtype, progress=args.progress,
    )
    print(result.format())
    return 0


def _cmd_eval(args) -> int:
    from sparseforge.pipeline import evaluate_model

    print(evaluate_model(args.model, reference=args.reference, seqlen=args.seqlen,
                         max_windows=args.max_windows, progress=args.progress))
    return 0


def _cmd_inspect(args) -> int:
    from sparseforge.inspection import format_report, inspect_path

    print(format_report(inspect_path(args.path)))
    return 0


def _cmd_demo(args) -> int:
    from sparseforge.pipeline import run_demo

    run_demo(out=args.out, patterns=tuple(args.patterns), sparsity=args.sparsity, progress=args.progress)
    return 0


COMMANDS = {"prune": _cmd_prune, "eval": _cmd_eval, "inspect": _cmd_inspect, "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SparseforgeError as exc:
        print(f"sparseforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparseforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
