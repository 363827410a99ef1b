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

bfloat16 (``--values fp32,bf16`` or ``--values bf16``; default ``fp32``): the column variants with
bfloat16 values (activations and sums stay float32; ``--teal-values fp32,bf16`` adds the TEAL
variants with bfloat16 weights, ``SparseInputLinear(dtype=torch.bfloat16)``), and a dense bfloat16
baseline: the same model (same seed) converted to bfloat16, decoded by the native engine with its
bf16 GEMV (this CPU's best dense path where it has AVX512_BF16). ``vs dense bf16`` divides by that
baseline; the bytes bound of the bfloat16 variants is taken against dense bfloat16: ``(L + H) / 2``
bytes against ``L (1 - s) r / 2 + H`` (their lm_head stays float32, as in the fp32 model they are
swapped into).

Memory: peak RSS of 4-layer runs (the full shape has 16): 3.6 GB for the default variants (3.2 GB
with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment, which hands freed weight-sized tensors
back to the system), 3.2 GB for ``--values bf16 --teal-values none`` (the TEAL copy freed once the
column layers are built), 4.0 GB for ``--values fp32,bf16``; at 16 layers the last was killed by the
OOM killer at 15.6 GB. Plan on ~12 GB free for the default run at the full shape.

Printed beside each variant: the bytes bound of the whole model at that sparsity,
``(L + H) / (L (1 - s) + H)`` with ``L`` the sparsified projections' bytes and ``H`` the dense rest
read per token (lm_head; embeddings and the KV cache are negligible at this context), and the
measured speedup's fraction of it.

The native engine fuses q/k/v and gate/up (``fuse=True``): the column layers of each sibling set are
grouped (:class:`sparseforge.activation.column_group.ColumnSparseSiblings`: each keeps its own TEAL
threshold, and the set's batch-1 products run as one native call, 64 calls per token instead of 112);
``--ungrouped`` adds each column variant once more with the siblings called one by one (``fuse=False``),
in the same run.

Where a step's time goes (``--breakdown``): for each sparse variant, after the timed runs, two more
runs of ``--breakdown-tokens`` and of 4 tokens, with every sparse layer's batch-1 kernel (the
``bound_gemv`` the engine calls) wrapped in a wall-clock timer; the difference of the two runs over
the difference of their tokens is the time per token inside those kernels (the engine's set-up and
prefill cancel out). The dense lm_head is timed alone (``F.linear`` on ``(1, hidden)`` at ``--threads``
torch threads, as the engine runs it) and the rest of the step (attention, norms, rotary, SwiGLU,
the Python loop) is what remains of the step's time.

Usage:
    python benchmarks/bench_activation_decode.py --quick   # hidden 256, 2 layers (smoke)
    python benchmarks/bench_activation_decode.py --breakdown --sparsities 0.5 --new 16   # + time split per step
    python benchmarks/bench_activation_decode.py           # the full shape (~6 GB of RAM)
    python benchmarks/bench_activation_decode.py --start-file START   # warm up, then time once START exists
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_output import write_json  # noqa: E402
from bench_timing import TokenClock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
UNGROUPED = ", siblings ungrouped"  # suffix of the --ungrouped variants


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
    p.add_argument("--values", default="fp32",
                   help="weight dtypes of the sparse variants (comma list of fp32, bf16); bf16 adds the dense bf16 baseline")
    p.add_argument("--teal-values", default="fp32",
                   help="weight dtypes of the TEAL-alone variants (comma list of fp32, bf16; none: no TEAL-alone variant, and "
                        "the TEAL layers are freed once the column layers are built)")
    p.add_argument("--engine", choices=("native", "transformers"), default="native",
                   help="decode loop of every variant: the native engine (default, what `sparseforge generate` runs) "
                        "or transformers' generate")
    p.add_argument("--breakdown", action="store_true",
                   help="also split each sparse variant's step: its sparse kernels, the lm_head, the rest (module doc)")
    p.add_argument("--breakdown-tokens", type=int, default=20, help="tokens of the longer --breakdown run")
    p.add_argument("--ungrouped", action="store_true",
                   help="also run each column variant with its q/k/v and gate/up called one by one (the engine's "
                        "fuse=False) instead of one grouped call each (ColumnSparseSiblings)")
    p.add_argument("--start-file", type=Path, default=None,
                   help="after building and warming up every variant, wait until this file exists before the timed "
                        "runs (start the timing from a quiet moment)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not 0.0 <= args.weight_sparsity < 1.0:
        p.error("--weight-sparsity must be in [0, 1)")
    args.values = args.values.split(",")
    args.teal_values = [] if args.teal_values == "none" else args.teal_values.split(",")
    if not args.values or set(args.values) - {"fp32", "bf16"}:
        p.error("--values takes a comma list of fp32, bf16")
    if set(args.teal_values) - {"fp32", "bf16"}:
        p.error("--teal-values takes a comma list of fp32, bf16, or none")
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


def column_layers(sparse_layers: dict, weight_sparsity: float, dtype: torch.dtype = torch.float32) -> tuple[dict, float]:
    """``{name: ColumnSparseLinear}``: each TEAL layer's weight pruned to ``weight_sparsity`` by
    magnitude (per layer), stored in the column bitmap format (values of ``dtype``) with the same
    threshold; and the column bytes / dense bytes of ``dtype`` of them all."""
    from sparseforge.activation import ColumnSparseLinear
    from sparseforge.formats.colbitmap import ColumnBitmapWeight

    layers, col_bytes, dense_bytes = {}, 0, 0
    for name, m in sparse_layers.items():
        w = m.weight.detach()  # (out, in)
        k = max(1, int(w.numel() * weight_sparsity))
        cut = w.abs().flatten().kthvalue(k).values
        pruned = torch.where(w.abs() > cut, w, torch.zeros(()))  # (out, in)
        weight = ColumnBitmapWeight.from_dense(pruned.to(dtype), pruned != 0)
        layer = ColumnSparseLinear(weight, m.bias, threshold=m.threshold)
        layers[name] = layer
        col_bytes += weight.nbytes
        dense_bytes += w.numel() * w.new_empty((), dtype=dtype).element_size()
    return layers, col_bytes / dense_bytes


def decode_seconds(model, prompt: torch.Tensor, new: int, engine: str, fuse: bool = True) -> float:
    """Seconds per generated token, from the first generated token to the last (``TokenClock``: no
    prefill, no engine set-up), greedy, through the native engine (``fuse``: q/k/v and gate/up fused or
    grouped, its default) or transformers' ``generate``."""
    from sparseforge.generation.loop import native_generate

    clock = TokenClock()
    with torch.inference_mode():
        if engine == "native":
            native_generate(model, prompt, max_new_tokens=new, min_new_tokens=new, streamer=clock, fuse=fuse)
        else:
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, streamer=clock)
    return 1.0 / clock.decode_tps()


def kernel_seconds(model, layers: dict, prompt: torch.Tensor, new: int, engine: str,
                   fuse: bool = True) -> tuple[float, float]:
    """(seconds in the bound batch-1 kernels of ``layers``, seconds per token) of one decode of ``new``
    tokens: each layer's ``bound_gemv`` is wrapped in a wall-clock timer for the run, then restored, and so is
    that of the sibling groups (``ColumnSparseSiblings``) the engine builds over them."""
    from sparseforge.activation.column_group import ColumnSparseSiblings

    spent = [0.0]

    def timed_binder(layer, method=None):
        def bound_gemv():
            gemv = (method or type(layer).bound_gemv)(layer)
            if gemv is None:
                return None

            def timed(x):
                t0 = time.perf_counter()
                y = gemv(x)
                spent[0] += time.perf_counter() - t0
                return y
            return timed
        return bound_gemv

    for layer in layers.values():
        layer.bound_gemv = timed_binder(layer)  # an instance attribute shadows the method for this run
    group_bound = ColumnSparseSiblings.bound_gemv
    ColumnSparseSiblings.bound_gemv = lambda group: timed_binder(group, group_bound)()  # built by the engine
    try:
        per_token = decode_seconds(model, prompt, new, engine, fuse)
    finally:
        ColumnSparseSiblings.bound_gemv = group_bound
        for layer in layers.values():
            del layer.bound_gemv
    return spent[0], per_token


def lm_head_seconds(model, threads: int) -> float:
    """Median seconds of the dense lm_head on one token, ``F.linear`` at ``threads`` torch threads."""
    w = model.lm_head.weight.detach()
    x = torch.randn(1, w.shape[1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(5):
                torch.nn.functional.linear(x, w)
            ts = []
            for _ in range(50):
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, w)
                ts.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return statistics.median(ts)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from sparseforge import kernels
    from sparseforge.activation import ActivationSparsityConfig, SparseInputLinear, sparse_input_layers, sparsify_activations_
    from sparseforge.config import CalibrationConfig
    from sparseforge.layers import set_module

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    # the dense bf16 baseline first (same seed: the same weights), so that its float32 original is freed before
    # the float32 model and its sparse copies exist
    model_bf16 = build_model(args).to(torch.bfloat16) if "bf16" in args.values + args.teal_values else None
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

    # dense twice: torch's threads, and torch single-threaded like the TEAL runs; the faster is the baseline.
    # A variant is (layers to swap in or None for dense, sparsity, its dense baseline's dtype).
    variants = {"dense fp32": (None, 0.0, "fp32"), "dense fp32 (torch 1 thread)": (None, 0.0, "fp32")}
    ratios = {}  # layer set -> its bytes / dense bytes of its dtype
    layer_sets = {}
    if model_bf16 is not None:
        variants["dense bf16"] = ("bf16 model", 0.0, "bf16")
    for dt in ("fp32", "bf16"):
        dtype = torch.float32 if dt == "fp32" else torch.bfloat16
        tag = "" if dt == "fp32" else " (bf16 weights)"
        if dt in args.teal_values:
            layer_sets[f"teal {dt}"] = sparse_layers if dt == "fp32" else {
                n: SparseInputLinear.from_linear(dense_layers[n], m.threshold, dtype=dtype) for n, m in sparse_layers.items()}
            ratios[f"teal {dt}"] = 1.0
            variants.update({f"TEAL {s:.0%}{tag}": (f"teal {dt}", s, dt) for s in args.sparsities})
        if args.weight_sparsity and dt in args.values:
            layer_sets[f"column {dt}"], ratios[f"column {dt}"] = column_layers(sparse_layers, args.weight_sparsity, dtype)
            for s in args.sparsities:
                name = f"weight {args.weight_sparsity:.0%} (column{', bf16 values' if tag else ''}) + TEAL {s:.0%}"
                variants[name] = (f"column {dt}", s, dt)
                if args.ungrouped:
                    variants[name + UNGROUPED] = (f"column {dt}", s, dt)
    if "fp32" not in args.teal_values:  # the float32 TEAL layers only served to build the others: free them
        use(dense_layers)
        del sparse_layers
    prompt = torch.randint(1, args.vocab, (1, 8), generator=torch.Generator().manual_seed(0))

    def run_variant(name, variant, new):
        gc.collect()  # the previous run's fused q/k/v and gate/up copies (generation.fuse), before the next run
        layers, s, _ = variant
        if layers == "bf16 model":
            return decode_seconds(model_bf16, prompt, new, args.engine)
        if layers is None:
            use(dense_layers)
            ctx = kernels.sparse_threads(args.threads) if "1 thread" in name else nullcontext()
        else:
            use(layer_sets[layers])
            report.retarget_(model, s)
            ctx = kernels.sparse_threads(args.threads)
        with ctx:
            return decode_seconds(model, prompt, new, args.engine, fuse=not name.endswith(UNGROUPED))

    for name, variant in variants.items():
        run_variant(name, variant, 3)  # warm-up
    if args.start_file is not None:
        print(f"warmed up; waiting for {args.start_file}", flush=True)
        while not args.start_file.exists():
            time.sleep(0.5)
    times = {k: [] for k in variants}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, variant in variants.items():
            times[name].append(run_variant(name, variant, args.new))
    base = min(statistics.median(times["dense fp32"]), statistics.median(times["dense fp32 (torch 1 thread)"]))
    base_bf16 = statistics.median(times["dense bf16"]) if "dense bf16" in times else None
    rows = []
    for name, (layers, sp, dt) in variants.items():
        med = statistics.median(times[name])
        ratio = ratios.get(layers, 1.0)
        # bytes bound against the dense model of the variant's dtype: the bf16 model reads half the bytes of
        # everything, a bf16-weights variant half of its projections' bytes and the float32 lm_head
        half = 0.5 if dt == "bf16" and layers != "bf16 model" else 1.0
        bound = half * (layer_bytes + rest_bytes) / (half * layer_bytes * (1 - sp) * ratio + rest_bytes)
        own_base = base_bf16 if dt == "bf16" else base
        rows.append({"variant": name, "sparsity": sp, "values": dt,
                     "weight_sparsity": args.weight_sparsity if (layers or "").startswith("column") else 0.0,
                     "tokens_per_s": 1.0 / med, "s_per_token": med, "speedup": base / med,
                     "vs_dense_bf16": base_bf16 / med if base_bf16 else None, "bytes_bound": bound,
                     "of_bound": (own_base / med) / bound, "runs_s_per_token": times[name]})
    result = {"shape": {k: getattr(args, k) for k in ("hidden", "layers", "ffn", "vocab")}, "gqa_kv_heads": max(1, args.hidden // 256),
              "column_bytes_ratio": {k: v for k, v in ratios.items() if k.startswith("column")} or None, "new_tokens": args.new, "engine": args.engine, "threads": args.threads, "isa": kernels.isa(), "layer_bytes": layer_bytes,
              "rest_bytes": rest_bytes, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}
    print(f"decode, batch 1, {args.new} new tokens, hidden {args.hidden}, {args.layers} layers, FFN {args.ffn}, GQA, "
          f"vocab {args.vocab}, fp32 model (column values: {', '.join(args.values)}; TEAL weights: {', '.join(args.teal_values) or 'none'}), {args.engine} decode loop, {args.threads} threads, isa {result['isa']}, load {load_before[0]:.1f} -> "
          f"{result['loadavg_after'][0]:.1f}")
    print("| variant | tokens/s | vs dense fp32 | vs dense bf16 | bytes bound (vs dense of its dtype) | % of bound |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        vs_bf16 = f"{r['vs_dense_bf16']:.2f}x" if r["vs_dense_bf16"] else "-"
        print(f"| {r['variant']} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | {vs_bf16} | {r['bytes_bound']:.2f}x "
              f"| {r['of_bound']:.0%} |")
    if args.breakdown:
        result["breakdown"] = breakdown(args, model, prompt, variants, layer_sets, report, use, kernels)
    result["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


def breakdown(args, model, prompt, variants, layer_sets, report, use, kernels) -> list[dict]:
    """Per sparse variant: ms per token in its sparse kernels, in the lm_head (timed alone) and in the
    rest of the step (module doc); printed as a table."""
    head = lm_head_seconds(model, args.threads)
    short, long_ = 4, max(args.breakdown_tokens, 8)
    rows = []
    for name, (layers, s, _) in variants.items():
        if layers is None or layers == "bf16 model":
            continue
        gc.collect()
        use(layer_sets[layers])
        report.retarget_(model, s)
        with kernels.sparse_threads(args.threads):
            fuse = not name.endswith(UNGROUPED)
            k_short, _ = kernel_seconds(model, layer_sets[layers], prompt, short, args.engine, fuse)
            k_long, step = kernel_seconds(model, layer_sets[layers], prompt, long_, args.engine, fuse)
        in_kernels = (k_long - k_short) / (long_ - short)
        rows.append({"variant": name, "step_ms": 1e3 * step, "sparse_kernels_ms": 1e3 * in_kernels,
                     "lm_head_ms": 1e3 * head, "rest_ms": 1e3 * (step - in_kernels - head)})
    print(f"\nwhere a step goes ({long_} - {short} tokens; lm_head timed alone):\n"
          "| variant | ms per token | sparse kernels | lm_head | rest (attention, norms, glue) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        st = r["step_ms"]
        print(f"| {r['variant']} | {st:.2f} | {r['sparse_kernels_ms']:.2f} ({r['sparse_kernels_ms'] / st:.0%}) | "
              f"{r['lm_head_ms']:.2f} ({r['lm_head_ms'] / st:.0%}) | {r['rest_ms']:.2f} ({r['rest_ms'] / st:.0%}) |")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
