"""What a pruned model costs before its first token: ``compress_`` and the first ``native_generate`` call.

The first call of the native decode engine fuses q/k/v and gate/up (:mod:`sparseforge.generation.fuse`)
and runs the prompt through the model's batched layers; whatever a layer does once (stacking formats,
measuring kernel tiles) lands there and shows as prefill time in every benchmark harness. This script
builds a random Llama of issue 13's shape (hidden 2048, FFN 5632, 32 heads / 4 KV heads, vocab 4096;
``--layers`` decoder layers, 4 by default, 16 for the full 721M model), magnitude-prunes it to each
``--variants`` entry, and times, in one process per variant and with an empty tuning cache (a fresh
``SPARSEFORGE_CACHE_DIR``):

* ``compress_s``: ``compress_(model, format="rule")`` (one call per decoder layer with ``--per-layer``,
  which keeps the peak memory near the dense model's for the 16-layer run);
* ``first_s`` / ``first_prefill_s``: the first ``native_generate`` call (prompt ``--prompt`` tokens,
  ``--new`` new tokens) and its time to the first token;
* ``second_s`` / ``second_prefill_s``: the same call again (what every later call costs);
* ``tokens``: the greedy tokens of both calls (they must agree; compare them across code versions).

It runs unchanged against older sparseforge versions (``compress_`` keywords it does not know are not
passed), so a before / after pair is the same script under two checkouts on the same machine state.

    python benchmarks/bench_first_call.py --quick                  # tiny shapes (smoke, seconds)
    python benchmarks/bench_first_call.py --layers 4               # reduced 721M-like model
    python benchmarks/bench_first_call.py --layers 16 --per-layer --variants 2:4
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import host_info, host_line  # noqa: E402
from bench_output import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=["2:4", "0.75"], help="N:M patterns or unstructured sparsities")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (a batched prefill: the lanes kernels)")
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-layer", action="store_true", help="compress_ one decoder layer at a time (lower peak memory)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.shape = dict(hidden=2048, ffn=5632, heads=32, kv_heads=4, vocab=4096)
    if args.quick:
        args.shape = dict(hidden=256, ffn=704, heads=4, kv_heads=2, vocab=512)
        args.layers, args.prompt, args.new = min(args.layers, 2), 8, 4
    if args.out is None:
        args.out = RESULTS / ("first_call.quick.json" if args.quick else f"first_call.{args.layers}l.json")
    return args


def build(args, variant: str):
    """A random Llama (seed 0), magnitude-pruned to ``variant`` (not yet compressed)."""
    import transformers as t

    import sparseforge as sf

    torch.manual_seed(0)
    s = args.shape
    cfg = t.LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=args.layers,
                        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                        max_position_embeddings=args.prompt + args.new + 8, tie_word_embeddings=False,
                        bos_token_id=0, eos_token_id=0)
    model = t.LlamaForCausalLM(cfg).float().eval()
    kw = dict(pattern=variant) if ":" in variant else dict(pattern="unstructured", sparsity=float(variant))
    sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", **kw), progress=False)
    return model


def compress(model, args) -> tuple[float, list[str]]:
    """Seconds of ``compress_(format="rule")`` (per decoder layer with ``--per-layer``), and the formats built."""
    from sparseforge.runtime.compress import compress_

    known = inspect.signature(compress_).parameters
    reports = []
    start = time.perf_counter()
    if args.per_layer:
        for i in range(args.layers):
            reports.append(compress_(model, format="rule", targets=[f"model.layers.{i}.*"]))
    else:
        reports.append(compress_(model, format="rule"))
    seconds = time.perf_counter() - start
    formats = sorted({c.format for r in reports for c in r.converted})
    tiles = sum(len(getattr(r, "tiles", {})) for r in reports)
    print(f"  compress_: {seconds:.2f} s ({', '.join(formats)}; lanes tiles measured for {tiles} layer(s)"
          f"{'' if 'tile_batches' in known else ': this version measures them at first use'})", flush=True)
    return seconds, formats


def generate_once(model, ids, args) -> dict:
    from sparseforge import kernels
    from sparseforge.generation import timing_streamer
    from sparseforge.generation.loop import native_generate

    clock = timing_streamer()
    with kernels.sparse_threads(args.threads), torch.inference_mode():
        start = time.perf_counter()
        out = native_generate(model, ids, max_new_tokens=args.new, min_new_tokens=args.new, streamer=clock)
        end = time.perf_counter()
    t = clock.arrivals
    return {"s": end - start, "prefill_s": t[0] - start, "tokens": out[0, ids.shape[1]:].tolist()}


def measure(args, variant: str) -> dict:
    os.environ["SPARSEFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sf-first-call-")  # an empty tuning cache
    model = build(args, variant)
    compress_s, formats = compress(model, args)
    ids = torch.randint(1, args.shape["vocab"], (1, args.prompt), generator=torch.Generator().manual_seed(1))
    first = generate_once(model, ids, args)
    second = generate_once(model, ids, args)
    row = {"variant": variant, "formats": formats, "layers": args.layers, "compress_s": compress_s,
           "first_s": first["s"], "first_prefill_s": first["prefill_s"], "second_s": second["s"],
           "second_prefill_s": second["prefill_s"], "tokens": first["tokens"],
           "same_tokens_both_calls": first["tokens"] == second["tokens"]}
    print(f"  first call {first['s']:.2f} s (prefill {first['prefill_s']:.2f} s), second {second['s']:.2f} s "
          f"(prefill {second['prefill_s']:.2f} s); tokens {first['tokens']}", flush=True)
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    import sparseforge

    print(host_line(), flush=True)
    print(f"sparseforge {sparseforge.__version__} from {Path(sparseforge.__file__).parent}; {args.layers} layer(s), "
          f"prompt {args.prompt}, {args.new} new tokens, {args.threads} kernel threads", flush=True)
    rows = []
    for variant in args.variants:
        print(f"{variant}:", flush=True)
        rows.append(measure(args, variant))
    print(f"\n{'variant':<8} {'compress_ s':>11} {'1st call s':>10} {'1st prefill s':>13} {'2nd call s':>10}")
    for r in rows:
        print(f"{r['variant']:<8} {r['compress_s']:>11.2f} {r['first_s']:>10.2f} {r['first_prefill_s']:>13.2f} "
              f"{r['second_s']:>10.2f}")
    result = {"host": host_info(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
