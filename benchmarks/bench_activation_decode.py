"""End-to-end batch-1 decoding with TEAL activation sparsity: tokens/s dense vs TEAL 40% / 50%.

A Llama-shaped model with random weights (no download; the shape of ``bench_decode.py``: hidden
2048, 16 layers, FFN 5632, vocab 8192, here with GQA: 32 query heads, 8 key/value heads), fp32.
TEAL (uniform) is calibrated once at the highest sparsity on random token ids
(``sparsify_activations_``), which swaps every projection for a ``SparseInputLinear``; the other
sparsities reuse that calibration (``report.retarget_``). The original ``nn.Linear`` modules are
kept and swapped back in for the dense runs, so dense and sparse runs interleave (drifting load
hits every variant alike) without a second copy of the model. Each run generates ``--new`` tokens
greedily after an 8-token prompt (through the native decode engine, ``--engine transformers`` for
transformers' ``generate``); the median of ``--repeats`` runs is reported. The TEAL variants run
inside ``kernels.sparse_threads`` (torch single-threaded, the kernels on all threads); dense runs both
with torch's threads and single-threaded, and the faster of the two is the baseline (``vs dense``).

Weight x activation sparsity (``--weight-sparsity``, default 0.5; 0 skips it): each projection's
weight is also pruned to that fraction by magnitude (per layer) and stored in the column bitmap
format (:class:`sparseforge.activation.ColumnSparseLinear`, built from the TEAL layers, same
thresholds), run at each TEAL sparsity; its bytes bound uses the column format's bytes
(``L (1 - s) r + H`` with ``r`` = column bytes / dense bytes). The issue's target: 50% weight + 50%
activation >= 2.5x the dense fp32 tokens/s of the same run. Its quality is not measured here
(random weights).

Printed beside each variant: the bytes bound of the whole model at that sparsity,
``(L + H) / (L (1 - s) + H)`` with ``L`` the sparsified projections' bytes and ``H`` the dense rest
read per token (lm_head; embeddings and the KV cache are negligible at this context), and the
measured speedup's fraction of it.

Usage:
    python benchmarks/bench_activation_decode.py --quick   # hidden 256, 2 layers (smoke)
    python benchmarks/bench_activation_decode.py           # the full shape (~6 GB of RAM)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_output import write_json  # noqa: E402
from bench_timing import TokenClock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--sparsities", default="0.4,0.5")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weight-sparsity", type=float, default=0.5, help="pruned fraction of the column-format variants (0: none)")
    p.add_argument("--engine", choices=("native", "transformers"), default="native",
                   help="decode loop of every variant: the native engine (default, what `sparseforge generate` runs) "
                        "or transformers' generate")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not 0.0 <= args.weight_sparsity < 1.0:
        p.error("--weight-sparsity must be in [0, 1)")
    if args.quick:
        args.hidden, args.layers, args.ffn, args.vocab, args.new, args.repeats = 256, 2, 704, 1024, 16, 2
    args.sparsities = sorted((float(s) for s in args.sparsities.split(",")), reverse=True)
    args.out = args.out or RESULTS / ("activation_decode.quick.json" if args.quick else "activation_decode.json")
    return args


def build_model(args):
    import transformers as t

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = t.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=args.vocab,
                        max_position_embeddings=max(256, args.new + 16), tie_word_embeddings=False)
    return t.LlamaForCausalLM(cfg).float().eval()


def column_layers(sparse_layers: dict, weight_sparsity: float) -> tuple[dict, float]:
    """``{name: ColumnSparseLinear}``: each TEAL layer's weight pruned to ``weight_sparsity`` by
    magnitude (per layer), stored in the column bitmap format with the same threshold; and the
    column bytes / dense fp32 bytes of them all."""
    from sparseforge.activation import ColumnSparseLinear
    from sparseforge.formats.colbitmap import ColumnBitmapWeight

    layers, col_bytes, dense_bytes = {}, 0, 0
    for name, m in sparse_layers.items():
        w = m.weight.detach()  # (out, in)
        k = max(1, int(w.numel() * weight_sparsity))
        cut = w.abs().flatten().kthvalue(k).values
        weight = ColumnBitmapWeight.from_dense(torch.where(w.abs() > cut, w, torch.zeros(())))
        layer = ColumnSparseLinear(weight, m.bias, threshold=m.threshold)
        layers[name] = layer
        col_bytes += weight.nbytes
        dense_bytes += w.numel() * 4
    return layers, col_bytes / dense_bytes


def decode_seconds(model, prompt: torch.Tensor, new: int, engine: str) -> float:
    """Seconds per generated token, from the first generated token to the last (``TokenClock``: no
    prefill, no engine set-up), greedy, through the native engine or transformers' ``generate``."""
    from sparseforge.generation.loop import native_generate

    clock = TokenClock()
    with torch.inference_mode():
        if engine == "native":
            native_generate(model, prompt, max_new_tokens=new, min_new_tokens=new, streamer=clock)
        else:
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, streamer=clock)
    return 1.0 / clock.decode_tps()


def main(argv=None) -> dict:
    args = parse_args(argv)
    from sparseforge import kernels
    from sparseforge.activation import ActivationSparsityConfig, sparse_input_layers, sparsify_activations_
    from sparseforge.config import CalibrationConfig
    from sparseforge.layers import set_module

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    model = build_model(args)
    dense_layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    calib = torch.randint(0, args.vocab, (8, 64), generator=torch.Generator().manual_seed(1))
    report = sparsify_activations_(model, ActivationSparsityConfig(
        sparsity=args.sparsities[0], calibration=CalibrationConfig(batch_size=4)), calibration=calib, progress=False)
    sparse_layers = sparse_input_layers(model)
    layer_bytes = sum(m.weight.numel() * 4 for m in dense_layers.values())
    rest_bytes = model.lm_head.weight.numel() * 4

    def use(layers):
        for name, module in layers.items():
            set_module(model, name, module)

    # dense twice: torch's threads, and torch single-threaded like the TEAL runs; the faster is the baseline
    variants = {"dense fp32": None, "dense fp32 (torch 1 thread)": None, **{f"TEAL {s:.0%}": s for s in args.sparsities}}
    col_layers, col_ratio = ({}, 1.0) if not args.weight_sparsity else column_layers(sparse_layers, args.weight_sparsity)
    if col_layers:
        variants.update({f"weight {args.weight_sparsity:.0%} (column) + TEAL {s:.0%}": ("column", s) for s in args.sparsities})
    prompt = torch.randint(1, args.vocab, (1, 8), generator=torch.Generator().manual_seed(0))

    def run_variant(name, s, new):
        if s is None:
            use(dense_layers)
            ctx = kernels.sparse_threads(args.threads) if "1 thread" in name else nullcontext()
        elif isinstance(s, tuple):
            use(col_layers)
            report.retarget_(model, s[1])
            ctx = kernels.sparse_threads(args.threads)
        else:
            use(sparse_layers)
            report.retarget_(model, s)
            ctx = kernels.sparse_threads(args.threads)
        with ctx:
            return decode_seconds(model, prompt, new, args.engine)

    for name, s in variants.items():
        run_variant(name, s, 3)  # warm-up
    times = {k: [] for k in variants}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, s in variants.items():
            times[name].append(run_variant(name, s, args.new))
    base = min(statistics.median(times["dense fp32"]), statistics.median(times["dense fp32 (torch 1 thread)"]))
    rows = []
    for name, s in variants.items():
        med = statistics.median(times[name])
        sp = 0.0 if s is None else s[1] if isinstance(s, tuple) else s
        ratio = col_ratio if isinstance(s, tuple) else 1.0
        bound = (layer_bytes + rest_bytes) / (layer_bytes * (1 - sp) * ratio + rest_bytes)
        rows.append({"variant": name, "sparsity": sp, "weight_sparsity": args.weight_sparsity if isinstance(s, tuple) else 0.0, "tokens_per_s": 1.0 / med, "s_per_token": med,
                     "speedup": base / med, "bytes_bound": bound, "of_bound": (base / med) / bound, "runs_s_per_token": times[name]})
    result = {"shape": {k: getattr(args, k) for k in ("hidden", "layers", "ffn", "vocab")}, "gqa_kv_heads": max(1, args.hidden // 256),
              "column_bytes_ratio": col_ratio if col_layers else None, "new_tokens": args.new, "engine": args.engine, "threads": args.threads, "isa": kernels.isa(), "layer_bytes": layer_bytes,
              "rest_bytes": rest_bytes, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}
    print(f"decode, batch 1, {args.new} new tokens, hidden {args.hidden}, {args.layers} layers, FFN {args.ffn}, GQA, "
          f"vocab {args.vocab}, fp32, {args.engine} decode loop, {args.threads} threads, isa {result['isa']}, load {load_before[0]:.1f} -> "
          f"{result['loadavg_after'][0]:.1f}")
    print("| variant | tokens/s | vs best dense | bytes bound | % of bound |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | {r['bytes_bound']:.2f}x | {r['of_bound']:.0%} |")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
