"""``sparseforge generate``: stream a causal LM's continuation of a prompt and report tokens/s.

The model is ``builtin``, a Hugging Face causal-LM directory or a sparseforge checkpoint (a
compressed one runs its pruned layers on the sparse kernels). The new text goes to stdout as it is
produced; the timing line (prefill and decode tokens/s, separately, and the engine that decoded)
goes to stderr, so ``sparseforge generate ... > out.txt`` keeps only the text. ``--engine auto``
(default) decodes with the native engine where it supports the model (Llama / Qwen2 / Mistral,
no ``--kv-policy`` / ``--compile``), else with transformers' ``generate``, saying why.

Example::

    sparseforge generate builtin --prompt "To be, or not to be" --max-new-tokens 64
    sparseforge generate pruned/ --prompt "ROMEO:" --temperature 0.8 --seed 1 --threads 2
    sparseforge generate builtin --prompt "ROMEO:" --kv-policy quest --kv-budget 256
    sparseforge generate builtin --prompt "ROMEO:" --engine transformers --no-lean
    sparseforge generate pruned-int8/ --prompt "ROMEO:" --int8-activations

Wiring (in ``sparseforge/cli.py``): ``add_parser(subparsers)`` adds the subcommand (torch-free) and
``run(args)`` runs it, returning the exit status.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("generate", help="stream a causal LM's continuation of a prompt; print prefill/decode tokens/s")
    p.add_argument("model", help="'builtin', a causal-LM directory, or a sparseforge checkpoint (dense or compressed)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--greedy", action="store_true", help="pick the most likely token each step (the default; excludes --temperature > 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all; default 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens holding this much probability "
                   "(nucleus; 1 = all, the default)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens, past the end-of-text token")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and the sparse kernels (default torch's)")
    p.add_argument("--engine", default="auto", choices=["auto", "native", "transformers"],
                   help="native: sparseforge's decode engine (Llama/Qwen2/Mistral); transformers: its generate; "
                        "auto (default): native where it supports the model and the options")
    p.add_argument("--lean", action=argparse.BooleanOptionalAction, default=True,
                   help="transformers engine: the lean decode path, fused sparse q/k/v and gate/up projections "
                        "(default on); see --compile")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile the decode step with a static KV cache (costs a minute or more once; pays for long generations)")
    p.add_argument("--attention", default="auto", choices=["auto", "native", "sdpa"],
                   help="native engine's decode attention: auto (default: the native kernel for float32 models, torch "
                        "SDPA for bf16 ones, which rounds as the model does), native (also for bf16: faster, greedy "
                        "tokens may part from the model's own after some steps) or sdpa")
    p.add_argument("--kv-policy", default=None, choices=["dense", "quest", "streaming", "mustafar"],
                   help="decode with a sparse KV-cache policy (sparseforge attention over a paged cache); see --kv-budget")
    p.add_argument("--kv-budget", type=int, default=2048,
                   help="tokens a --kv-policy reads per step (Quest's budget, StreamingLLM's sinks + window, "
                        "Mustafar's dense recent window; default 2048)")
    p.add_argument("--dense", action="store_true", help="load a compressed checkpoint dense instead of on the sparse kernels")
    p.add_argument("--int8-activations", action="store_true",
                   help="quantize each token's input to the int8-valued bitmap / N:M layers to int8 (integer sums; a "
                        "checkpoint pruned with --quantize int8; changes the numerics: docs/kernels.md)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the ``generate`` subcommand; returns the exit status (errors raise ``SparseforgeError``)."""
    from sparseforge.errors import ConfigError

    if args.greedy and args.temperature > 0:
        raise ConfigError("--greedy and --temperature > 0 contradict each other; drop one")
    if args.compile and not args.lean:
        raise ConfigError("--compile is part of the lean decode path; drop --no-lean")
    if args.engine == "native" and args.compile:
        raise ConfigError("--compile is part of the transformers engine's lean path; use --engine transformers")
    if args.engine == "native" and args.kv_policy is not None:
        raise ConfigError("--kv-policy runs on transformers' paged cache, not the native engine's static one; "
                          "use --engine transformers (or auto)")
    if args.attention != "auto" and (args.engine == "transformers" or args.kv_policy is not None or args.compile):
        raise ConfigError(f"--attention {args.attention} picks the native engine's decode attention; it does not apply to "
                          "the transformers engine (--engine transformers, --kv-policy, --compile): drop it")
    from sparseforge.generation.lean import LeanConfig
    from sparseforge.generation.text import GenerationSettings, generate, load_causal_lm

    GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed)  # checks the numbers before the model loads
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
    if not args.prompt.strip():
        raise ConfigError("the prompt is empty; give some text to continue (--prompt 'Once upon a time')")
    kv_policy = None
    if args.kv_policy is not None:
        from sparseforge.attention.speed import kv_policy as policy_named

        kv_policy = policy_named(args.kv_policy, args.kv_budget)
        if args.compile:
            raise ConfigError("--kv-policy runs on the paged dynamic cache; drop --compile (it needs the static cache)")
    if args.int8_activations and args.dense:
        raise ConfigError("--int8-activations runs the sparse int8 kernels; drop --dense")
    model, tokenizer, _ = load_causal_lm(args.model, sparse=not args.dense)
    if args.int8_activations:
        from sparseforge.runtime.compress import set_activation_precision_

        layers = set_activation_precision_(model, "int8")
        print(f"# int8 activations in {len(layers)} layer(s)", file=sys.stderr)
    lean = LeanConfig(compile=args.compile) if args.lean else False
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    result = generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
                      threads=args.threads, tokenizer=tokenizer, lean=lean, stream=sys.stdout, kv_policy=kv_policy,
                      engine=args.engine, attention=args.attention)
    for note in result.notes:
        print(note, file=sys.stderr)
    print(result.summary(), file=sys.stderr)
    return 0
