"""The ``sparseforge`` command line: a thin layer over the public API.

Subcommands: ``prune``, ``eval``, ``inspect``, ``demo``, ``train`` (a sparse-training recipe on the
built-in model and corpus), ``finetune`` (recovery fine-tuning of a pruned model), ``advise`` (will sparse be faster on this machine?), ``bench``
(generation tokens/s dense vs compressed), ``generate`` (stream a continuation, print tokens/s). Every run prints its resolved config as a
YAML recipe so it can be repeated with ``--recipe``. Errors print one line and exit with status 2.

Example::

    sparseforge prune builtin --method sparsegpt --pattern 2:4 --out pruned/
    sparseforge prune builtin --method sparsegpt --pattern 2:4 --quantize int8 --out pruned-int8/
    sparseforge eval pruned/
    sparseforge inspect pruned/
    sparseforge train --method rigl --sparsity 0.9 --steps 60 --output trained/
    sparseforge advise pruned/ --batch-sizes 1 64 --plot advise.png
    sparseforge bench pruned/ --batch-sizes 1 8
    sparseforge generate pruned/ --prompt "To be, or not" --max-new-tokens 32
    python -m sparseforge demo
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sparseforge.errors import SparseforgeError
from sparseforge.config import ALLOCATIONS, METHODS
from sparseforge.finetune import cli as finetune_cli
from sparseforge.generation import cli as generation_cli

__all__ = ["main", "build_parser"]


def _add_prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", type=Path, help="YAML recipe; its stages replace --method/--pattern/... below")
    p.add_argument("--method", default="sparsegpt", choices=METHODS)
    p.add_argument("--pattern", default="unstructured", help="unstructured, N:M (2:4), blockHxW, fanin, channel")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of zeros in [0, 1) (default 0.5; N:M fixes it)")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS, help="per-layer sparsity allocation")
    p.add_argument("--targets", nargs="+", default=None, metavar="GLOB", help="layers to prune (default: linears in the transformer blocks)")
    p.add_argument("--ignore", nargs="+", default=[], metavar="GLOB", help="layers never pruned")
    p.add_argument("--blocksize", type=int, default=None, help="SparseGPT column block size (default 128)")
    p.add_argument("--dampening", type=float, default=None, help="SparseGPT Hessian dampening, fraction of mean diag (default 0.01)")
    p.add_argument("--quantize", default=None, choices=("int8", "int4"), help="also quantize the pruned weights (symmetric, per output channel)")
    p.add_argument("--quant-method", default=None, choices=("joint", "rtn"),
                   help="joint: inside SparseGPT's pass (default with --method sparsegpt); rtn: round after pruning (default otherwise)")
    p.add_argument("--quant-group-size", type=int, default=None, help="input columns per scale (default: one scale per output channel)")
    p.add_argument("--calibration-data", default="builtin", help="'builtin' corpus, a .txt file or a directory of them")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--seed", type=int, default=0)


def _add_activation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("activation sparsity (calibrated after pruning, saved in the checkpoint)")
    g.add_argument("--activation-sparsity", type=float, default=None, metavar="S",
                   help="skip this fraction of the projections' input channels at inference, in [0, 1) (default: off)")
    g.add_argument("--activation-method", default="teal", help="teal (default) or cats")
    g.add_argument("--activation-allocation", default="uniform", help="uniform (default) or greedy (TEAL's block-wise search)")


def activation_config_from_args(args: argparse.Namespace):
    """The ActivationSparsityConfig of ``--activation-*`` (None without ``--activation-sparsity``);
    calibrated on the same data as the pruning stages."""
    if getattr(args, "activation_sparsity", None) is None:
        return None
    from sparseforge.activation import ActivationSparsityConfig

    calibration = config_from_args(args)[-1].calibration
    return ActivationSparsityConfig(method=args.activation_method, sparsity=args.activation_sparsity,
                                    allocation=args.activation_allocation, calibration=calibration)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """The ``train`` subcommand's options (run by :func:`sparseforge.train.cli.run`); torch-free."""
    p = subparsers.add_parser("train", help="sparse-train a causal LM (default: the built-in model and corpus) with a recipe")
    p.add_argument("model", nargs="?", default="builtin", help="'builtin' (default) or a causal-LM model directory")
    p.add_argument("--data", default="builtin", help="training text: 'builtin' corpus, a .txt file or a directory of them")
    p.add_argument("--recipe", type=Path, default=None, help="YAML training recipe (replaces --method/--sparsity/--pattern)")
    p.add_argument("--method", default="gmp", help="gmp, static, set, rigl, srigl, sparse_momentum, ste, srste, sste (default gmp)")
    p.add_argument("--sparsity", type=float, default=None, help="target sparsity (default 0.5; N:M and faninK fix it)")
    p.add_argument("--pattern", default=None, help="unstructured, fanin, blockHxW, channel, 2:4 (default: the method's)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60, about a minute on 2 cores)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows of 128 tokens for perplexity")
    p.add_argument("--seed", type=int, default=0, help="data order")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: small training steps gain little from more, and lose much when other jobs hold the cores)")
    p.add_argument("--output", type=Path, default=None, help="save the trained model here (sparseforge checkpoint)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


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
    _add_activation_options(p)

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

    add_train_parser(sub)
    finetune_cli.add_parser(sub)
    generation_cli.add_parser(sub)

    p = sub.add_parser("advise", help="measure dense vs each sparse format on this machine; pick per layer, plot speedup vs sparsity")
    p.add_argument("model", help="'builtin', 'minilm', or a model directory (pruned or not)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], metavar="B", help="tokens per call to measure at (default 1)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95], metavar="S",
                   help="sparsities of the random-weight sweep (plus 2:4)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="also sweep sparsity on random weights of each layer shape (the plot)")
    p.add_argument("--plot", type=Path, default=Path("advise.png"), help="PNG of speedup vs sparsity (needs matplotlib)")
    p.add_argument("--json", type=Path, default=None, help="also save all timings as JSON")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and the kernels (default torch's)")
    p.add_argument("--budget", type=float, default=0.2, help="seconds of calls per candidate and batch size")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse answers measured before on this CPU (the tuning cache; --no-cache measures afresh)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    p = sub.add_parser("cache", help="show or clear the per-machine tuning cache of measured 'auto' choices")
    p.add_argument("action", choices=["show", "clear", "path"], help="list the entries, delete the file, or print its path")

    p = sub.add_parser("bench", help="generation tokens/s and peak memory, dense vs compressed")
    p.add_argument("model", help="'builtin' or a causal-LM directory (e.g. one saved by prune or demo)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="B")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--format", default="auto", help="auto (measured per layer), rule, bitmap, nm, csr")
    p.add_argument("--pattern", default=None, help="prune by magnitude to this pattern first (speed only)")
    p.add_argument("--sparsity", type=float, default=None, help="prune by magnitude to this sparsity first (speed only)")
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True, help="peak RSS of each variant in a fresh process")
    p.add_argument("--sparse-threads", action=argparse.BooleanOptionalAction, default=True,
                   help="sparse variant with torch on 1 thread and the kernels on --threads (see kernels.sparse_threads)")
    p.add_argument("--kv-policy", default=None, choices=["dense", "quest", "streaming", "mustafar"],
                   help="instead: decode tokens/s at --context cached tokens, dense vs this KV policy (docs/attention.md)")
    p.add_argument("--kv-budget", type=int, default=2048, help="tokens the KV policy reads per step")
    p.add_argument("--context", type=int, default=4096, help="cached tokens for --kv-policy")
    p.add_argument("--kv-steps", type=int, default=3, help="timed decode steps per policy for --kv-policy")
    p.add_argument("--json", type=Path, default=None)
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
    method = getattr(args, "method", "sparsegpt")
    quantize = None
    if getattr(args, "quantize", None) is not None:
        from sparseforge.quant.config import parse_quantize

        quant_method = args.quant_method or ("joint" if method == "sparsegpt" else "rtn")
        quantize = parse_quantize(args.quantize, quant_method, args.quant_group_size)
    elif getattr(args, "quant_method", None) is not None or getattr(args, "quant_group_size", None) is not None:
        from sparseforge.errors import ConfigError

        raise ConfigError("--quant-method and --quant-group-size need --quantize int8 or int4")
    return [
        SparsifyConfig(
            method=method,
            pattern=args.pattern,
            sparsity=args.sparsity,
            targets=getattr(args, "targets", None),
            ignore=list(getattr(args, "ignore", [])),
            allocation=getattr(args, "allocation", "uniform"),
            method_options=options,
            calibration=CalibrationConfig(
                source=args.calibration_data, samples=args.samples, seqlen=args.seqlen, seed=args.seed
            ),
            quantize=quantize,
        )
    ]


def _cmd_prune(args) -> int:
    from sparseforge.config import dump_recipe
    from sparseforge.pipeline import prune_model

    configs = config_from_args(args)
    activation = activation_config_from_args(args)
    print("# resolved recipe (repeat with --recipe FILE)\n" + dump_recipe(configs), flush=True)
    if activation is not None:
        print(f"# activation sparsity: {activation.method} {activation.allocation} {activation.sparsity}", flush=True)
    result = prune_model(
        args.model, configs, out=args.out, compressed=args.compressed, overwrite=args.overwrite,
        evaluate=args.eval, dtype=args.dtype, progress=args.progress, activation=activation,
    )
    print(result.format())
    return 0


def _cmd_eval(args) -> int:
    from sparseforge.pipeline import evaluate_model

    print(evaluate_model(args.model, reference=args.reference, seqlen=args.seqlen,
                         max_windows=args.max_windows, progress=args.progress))
    return 0


def _cmd_inspect(args) -> int:
    from sparseforge.io.inspection import format_report, inspect_path

    print(format_report(inspect_path(args.path)))
    return 0


def _cmd_demo(args) -> int:
    from sparseforge.pipeline import run_demo

    run_demo(out=args.out, patterns=tuple(args.patterns), sparsity=args.sparsity, progress=args.progress)
    return 0


def _write_json(path: Path | None, data) -> None:
    if path is None:
        return
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}")


def _cmd_advise(args) -> int:
    from sparseforge.io.models import load_model
    from sparseforge.io.writable import check_output_file
    from sparseforge.layers import linear_layers, weight_2d
    from sparseforge.runtime.advise import advise_model, check_budget, weights_stream
    from sparseforge.runtime.sweep import plot_sweep, sweep

    check_budget(args.budget)
    check_output_file(args.plot if args.sweep else None, option="--plot")
    check_output_file(args.json, option="--json")
    model = load_model(args.model).model
    modules = dict(model.named_modules())
    pruned = [n for n in linear_layers(model) if float((weight_2d(modules[n]) == 0).float().mean()) >= 0.3]
    report = advise_model(model, names=pruned, batch_sizes=args.batch_sizes, threads=args.threads,
                          budget_s=args.budget, progress=args.progress, use_cache=args.cache)
    if not pruned:
        print("no linear layer of this model is pruned (>= 30% zeros): nothing to choose per layer"
              + ("; the sweep below shows what pruning would buy" if args.sweep else "; --sweep shows what pruning would buy"))
    if args.sweep:
        shapes = list(dict.fromkeys(tuple(weight_2d(modules[n]).shape) for n in linear_layers(model)))
        sweep(shapes, batch_sizes=args.batch_sizes, sparsities=args.sparsities, threads=args.threads,
              budget_s=args.budget, progress=args.progress, report=report, stream=weights_stream(model))
    print(report.table())
    if args.sweep:
        print(f"wrote {plot_sweep(report, args.plot)}")
    _write_json(args.json, report.to_dict())
    return 0


def _cmd_cache(args) -> int:
    from sparseforge.measure.tuning_cache import TuningCache, enabled

    cache = TuningCache()
    if args.action == "path":
        print(cache.path)
    elif args.action == "clear":
        print(f"removed {cache.clear()} measured answer(s) from {cache.path}")
    else:
        entries = cache.entries()
        print(f"{cache.path}: {len(entries)} measured answer(s)" + ("" if enabled() else " (SPARSEFORGE_TUNING_CACHE=off: not used)"))
        for e in entries:
            answer = e["answer"]
            name = answer.get("choice") or answer.get("name") if isinstance(answer, dict) else answer
            print(f"  {e['kind']}: {e['machine']['cpu']}, {e['machine']['threads']} thread(s): {e['question']} -> {name}")
    return 0


def _cmd_train(args) -> int:
    from sparseforge.train.cli import run

    return run(args)


def _cmd_bench(args) -> int:
    from sparseforge.evaluation.speed import bench_generation
    from sparseforge.io.writable import check_output_file

    check_output_file(args.json, option="--json")
    if args.kv_policy is not None:
        from sparseforge.attention.speed import kv_bench, kv_table

        results = kv_bench(args.model, args.context, args.kv_policy, args.kv_budget, steps=args.kv_steps)
        print(kv_table(results, args.context))
        _write_json(args.json, {"context": args.context, "kv_policy": args.kv_policy, "kv_budget": args.kv_budget,
                                "results": results})
        return 0
    report = bench_generation(args.model, batch_sizes=args.batch_sizes, new_tokens=args.new_tokens,
                              prompt_len=args.prompt_len, repeats=args.repeats, threads=args.threads,
                              format=args.format, pattern=args.pattern, sparsity=args.sparsity,
                              measure_rss=args.rss, progress=args.progress, sparse_threads=args.sparse_threads)
    print(report.table())
    _write_json(args.json, report.to_dict())
    return 0


COMMANDS = {"prune": _cmd_prune, "eval": _cmd_eval, "inspect": _cmd_inspect, "demo": _cmd_demo,
            "train": _cmd_train, "advise": _cmd_advise, "cache": _cmd_cache, "bench": _cmd_bench,
            "finetune": finetune_cli.run, "generate": generation_cli.run}


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
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
