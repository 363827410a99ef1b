"""MoE layer on CPU: sparseforge ``MoE`` vs transformers' ``MixtralSparseMoeBlock``, same weights.

For each configuration (8 experts top-2, d=1024, h=2816; 64 experts top-8, d=1024, h=352) it
measures, in one process and interleaved (each repetition runs every implementation once, in a
rotating order, so background load hits all of them alike):

* forward tokens/s (``torch.no_grad``, eval) on ``--tokens`` tokens (default 4096);
* forward+backward tokens/s (gradients w.r.t. the input and every weight);
* batch-1 decode latency (one token, ``torch.no_grad``), median of ``--decode-calls`` calls, in
  rounds of their own after the forward rounds (so every implementation's decode follows another
  one's decode, not its own 4096-token forward+backward). Ours
  runs its default decode path (``decode_backend="auto"``: the fastest of the native expert FFN
  kernel on the calling thread or on the kernels' pool and the torch chain, measured on the
  first call; ``SPARSEFORGE_CACHE_DIR`` selects the tuning cache) and, as
  a same-run before/after reference, ``decode_backend="torch"`` (the per-slot ``torch.mm`` chain,
  row ``sparseforge (torch decode)``), and the same layer with the pool's workers polling for
  ~0.2 ms after the native kernel instead of parking (``layer.decode_park_workers = False``, row
  ``pool polls``).

``--bf16x3`` adds ours with ``matmul_precision="bf16x3"`` (float32-accurate bf16x3 products on AMX,
opt-in) to the forward and forward+backward rounds; ``--hf-bf16-flag`` adds transformers' two
implementations under ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` (torch's public flag:
float32 matmuls as single bf16 products on oneDNN/AMX, ~1e-3 relative error, so not checked equal).
All of them are extra rows; the ratio column still compares with transformers' float32 runs.

transformers runs under ``config._experts_implementation = "eager"`` and ``"grouped_mm"`` (set on
the block's config; transformers 5 reads it at every forward). ``"batched_mm"`` is never run: it
materialises per-token expert weights (~190 GB at these sizes). Before timing, outputs are checked
equal (and, for forward+backward, input gradients), else the script exits non-zero.

Prints a markdown table (medians; ratio = sparseforge's speed / the faster transformers
implementation's, > 1 is better for sparseforge; also the same ratio for the best repetitions) and
writes every sample to ``benchmarks/results/moe.json``.

Usage::

    python benchmarks/bench_moe.py                  # full run, 2 threads (several minutes on 2 cores)
    python benchmarks/bench_moe.py --threads 1 2    # one run per thread count
    python benchmarks/bench_moe.py --quick    # 256 tokens, 2 repetitions: a smoke test
    python benchmarks/bench_moe.py --metrics decode --reps 15   # decode latency only
    python benchmarks/bench_moe.py --bf16x3 --hf-bf16-flag      # with the opt-in precision rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

CONFIGS = [
    {"name": "E8-top2", "experts": 8, "k": 2, "d": 1024, "h": 2816},
    {"name": "E64-top8", "experts": 64, "k": 8, "d": 1024, "h": 352},
]
IMPLS = ["sparseforge", "hf-eager", "hf-grouped_mm"]
X3 = "sparseforge-bf16x3"  # ours with matmul_precision="bf16x3" (opt-in; forward and forward+backward)
HF_BF16 = ["hf-eager-bf16flag", "hf-grouped_mm-bf16flag"]  # transformers under fp32_precision="bf16"
TORCH_DECODE = "sparseforge-torch-decode"  # ours with decode_backend="torch" (decode only)
POLL_DECODE = "sparseforge-pool-polls"  # ours, the pool's workers polling after the kernel (decode only)
DECODE_EXTRAS = [TORCH_DECODE, POLL_DECODE]
METRICS = ("forward", "forward_backward", "decode")


def _build(cfg: dict, seed: int, x3: bool = False):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from sparseforge.moe.hf import from_mixtral_block

    config = MixtralConfig(
        hidden_size=cfg["d"], intermediate_size=cfg["h"], num_local_experts=cfg["experts"],
        num_experts_per_tok=cfg["k"], router_jitter_noise=0.0,
    )
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
        block.gate.weight.normal_(0.0, 1.0 / cfg["d"] ** 0.5)  # spread routing over experts
    ours = from_mixtral_block(block)
    ours_x3 = from_mixtral_block(block, matmul_precision="bf16x3") if x3 else None
    return config, block, ours, ours_x3


class Runner:
    """Calls one implementation; ``impl`` selects ours or transformers' experts implementation."""

    def __init__(self, config, block, ours, ours_x3=None):
        self.config, self.block, self.ours, self.ours_x3 = config, block, ours, ours_x3

    def module(self, impl: str):
        self.ours.decode_park_workers = impl != POLL_DECODE
        torch.backends.mkldnn.matmul.fp32_precision = "bf16" if impl in HF_BF16 else "ieee"
        if impl == X3:
            return self.ours_x3
        if impl in ("sparseforge", *DECODE_EXTRAS):
            self.ours.decode_backend = "torch" if impl == TORCH_DECODE else "auto"
            return self.ours
        self.config._experts_implementation = impl.removeprefix("hf-").removesuffix("-bf16flag")
        return self.block

    def forward(self, impl: str, x: torch.Tensor) -> torch.Tensor:
        mod = self.module(impl)
        out = mod(x)
        return out[0] if isinstance(out, tuple) else out

    def forward_backward(self, impl: str, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        mod = self.module(impl)
        x = x.detach().requires_grad_()
        out = mod(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)
        for p in mod.parameters():
            p.grad = None
        return x.grad


def _check(runner: Runner, x: torch.Tensor, grad: torch.Tensor, extras=()) -> dict:
    """Max abs differences vs sparseforge; raises SystemExit when they are not close (the
    fp32_precision="bf16" runs are only reported: bf16 products differ by ~1e-3)."""
    diffs = {}
    with torch.no_grad():
        ref = runner.forward("sparseforge", x)
    ref_g = runner.forward_backward("sparseforge", x, grad)
    for impl in IMPLS[1:] + list(extras):
        with torch.no_grad():
            y = runner.forward(impl, x)
        g = runner.forward_backward(impl, x, grad)
        diffs[impl] = {
            "output": float((y - ref).abs().max()), "output_scale": float(ref.abs().max()),
            "input_grad": float((g - ref_g).abs().max()), "input_grad_scale": float(ref_g.abs().max()),
        }
        close = torch.allclose(y, ref, rtol=1e-4, atol=1e-5) and torch.allclose(g, ref_g, rtol=1e-3, atol=1e-5)
        if not close and impl not in HF_BF16:
            raise SystemExit(f"{impl}: outputs differ from sparseforge: {diffs[impl]}")
    return diffs


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_config(cfg: dict, tokens: int, reps: int, decode_calls: int, seed: int, metrics=METRICS,
                 extras=()) -> dict:
    config, block, ours, ours_x3 = _build(cfg, seed, x3=X3 in extras)
    runner = Runner(config, block, ours, ours_x3)
    block.train()  # jitter is 0: train and eval compute the same function
    ours.train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, cfg["d"], generator=gen)
    grad = torch.randn(1, tokens, cfg["d"], generator=gen)
    x1 = torch.randn(1, 1, cfg["d"], generator=gen)
    diffs = _check(runner, x[:, : min(tokens, 512)], grad[:, : min(tokens, 512)], extras)
    with torch.no_grad():
        for impl in IMPLS + DECODE_EXTRAS:  # warm-up, and decode equality
            y1 = runner.forward(impl, x1)
            if impl == "sparseforge":
                y1_ref = y1
            elif not torch.allclose(y1, y1_ref, rtol=1e-4, atol=1e-5):
                raise SystemExit(f"{impl}: decode output differs from sparseforge")
    batch_impls = IMPLS + list(extras)  # forward and forward+backward
    samples = {m: {i: [] for i in (IMPLS if m == "decode" else batch_impls)} for m in metrics}
    if "decode" in metrics:
        for impl in DECODE_EXTRAS:
            samples["decode"][impl] = []
    for rep in range(reps):  # forward and forward+backward rounds
        for impl in batch_impls[rep % len(batch_impls):] + batch_impls[: rep % len(batch_impls)]:  # rotate who goes first
            if "forward" in metrics:
                with torch.no_grad():
                    samples["forward"][impl].append(_time(lambda: runner.forward(impl, x)))
            if "forward_backward" in metrics:
                samples["forward_backward"][impl].append(_time(lambda: runner.forward_backward(impl, x, grad)))
    impls = IMPLS + DECODE_EXTRAS
    for rep in range(reps if "decode" in metrics else 0):  # decode rounds: every implementation after another's decode
        for impl in impls[rep % len(impls):] + impls[: rep % len(impls)]:
            with torch.no_grad():
                calls = [_time(lambda: runner.forward(impl, x1)) for _ in range(decode_calls)]
            samples["decode"][impl].append(statistics.median(calls))
    runner.module("sparseforge")  # the layer's parking and torch's precision back in place
    decode_choice = {t: {"path": c.name, "ms": c.ms, "reason": c.reason} for t, c in ours.decode_choice.items()}
    result = {"config": cfg, "tokens": tokens, "max_abs_diff": diffs, "median_s": {}, "samples_s": samples,
              "decode_choice": decode_choice}
    for metric, per_impl in samples.items():
        result["median_s"][metric] = {impl: statistics.median(v) for impl, v in per_impl.items()}
    return result


def bench_kernels(cfg: dict, tokens: int, reps: int, seed: int) -> dict:
    """GFLOP/s of the first expert matmul (x_e @ W_gate[e] for every expert), equal slices:
    ``torch.mm`` per slice (MKL), ``torch.nn.functional.grouped_mm`` (one call), oneDNN per slice and,
    where the CPU has AMX, bf16x3 per slice (float32 GFLOP/s: the useful work, not the 3 bf16 products)."""
    import torch.nn.functional as F

    from sparseforge.moe.grouped import _mm

    E, d, h = cfg["experts"], cfg["d"], cfg["h"]
    rows = tokens * cfg["k"] // E
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(rows * E, d, generator=gen)
    w = torch.randn(E, d, h, generator=gen) * d**-0.5
    offs = torch.arange(1, E + 1, dtype=torch.int32) * rows

    def loop(backend):
        return lambda: [_mm(xs[e * rows:(e + 1) * rows], w[e], backend) for e in range(E)]

    fns = {"mm (MKL)": loop("loop"), "grouped_mm": lambda: F.grouped_mm(xs, w, offs=offs), "oneDNN": loop("onednn")}
    errors = {}
    from sparseforge.ops.bf16x3 import amx_available

    if amx_available():  # bf16x3 on AMX: weights packed once (as the layer keeps them), x split per call
        from sparseforge.moe.bf16x3 import Bf16x3Matmul

        x3 = Bf16x3Matmul()
        fns["bf16x3 (AMX)"] = lambda: [x3.mm(xs[e * rows:(e + 1) * rows], w[e], key=e) for e in range(E)]
        exact = xs[:rows].double() @ w[0].double()  # (rows, h), expert 0
        for name, got in (("mm (MKL)", xs[:rows] @ w[0]), ("bf16x3 (AMX)", x3.mm(xs[:rows], w[0], key=0))):
            errors[name] = float((got.double() - exact).abs().max() / exact.abs().max())
    samples = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_time(fn))
    flops = 2.0 * rows * E * d * h
    return {"config": cfg["name"], "rows_per_expert": rows, "max_rel_err": errors,
            "gflops": {n: flops / statistics.median(v) / 1e9 for n, v in samples.items()}}


def _table(results: list[dict]) -> str:
    """Medians; the last column compares the best (fastest) repetitions, which a busy machine
    disturbs least."""
    lines = [
        "| config | metric | sparseforge | hf eager | hf grouped_mm | ratio vs best hf (medians) | ratio (best runs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for metric in [m for m in METRICS if m in r["samples_s"]]:
            med = {i: statistics.median(r["samples_s"][metric][i]) for i in IMPLS}
            best = {i: min(r["samples_s"][metric][i]) for i in IMPLS}
            if metric == "decode":
                cells = [f"{med[i] * 1e3:.2f} ms" for i in IMPLS]
            else:
                cells = [f"{r['tokens'] / med[i]:,.0f} tok/s" for i in IMPLS]
            ratios = [min(t["hf-eager"], t["hf-grouped_mm"]) / t["sparseforge"] for t in (med, best)]
            lines.append(
                f"| {r['config']['name']} | {metric.replace('_', '+')} | " + " | ".join(cells)
                + f" | {ratios[0]:.2f}x | {ratios[1]:.2f}x |"
            )
            labels = {TORCH_DECODE: "decode, ours with decode_backend='torch'",
                      POLL_DECODE: "decode, ours with the pool polling after the kernel",
                      X3: f"{metric.replace('_', '+')}, ours with matmul_precision='bf16x3'",
                      HF_BF16[0]: f"{metric.replace('_', '+')}, hf eager with fp32_precision='bf16'",
                      HF_BF16[1]: f"{metric.replace('_', '+')}, hf grouped_mm with fp32_precision='bf16'"}
            for extra in [e for e in DECODE_EXTRAS + [X3] + HF_BF16 if e in r["samples_s"][metric]]:
                v = r["samples_s"][metric][extra]
                m, b = statistics.median(v), min(v)
                cell = f"{m * 1e3:.2f} ms" if metric == "decode" else f"{r['tokens'] / m:,.0f} tok/s"
                lines.append(
                    f"| {r['config']['name']} | {labels[extra]} | {cell} | | "
                    f"| {min(med['hf-eager'], med['hf-grouped_mm']) / m:.2f}x "
                    f"| {min(best['hf-eager'], best['hf-grouped_mm']) / b:.2f}x |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 tokens, 2 repetitions, 5 decode calls")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-calls", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="one run per thread count")
    parser.add_argument("--configs", nargs="*", default=[c["name"] for c in CONFIGS])
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    parser.add_argument("--kernels", action="store_true", help="also time one expert matmul per backend")
    parser.add_argument("--bf16x3", action="store_true",
                        help="also time ours with matmul_precision='bf16x3' (opt-in, AMX) in forward and forward+backward")
    parser.add_argument("--hf-bf16-flag", action="store_true",
                        help="also time transformers under torch.backends.mkldnn.matmul.fp32_precision='bf16' (bf16 products)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.reps, args.decode_calls = 256, 2, 5
    import transformers

    from sparseforge.measure.tuning_cache import cpu_fingerprint

    configs = [(i, cfg) for i, cfg in enumerate(CONFIGS) if cfg["name"] in args.configs]
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        load_before = os.getloadavg()
        results = [
            bench_config(cfg, args.tokens, args.reps, args.decode_calls, seed=i, metrics=tuple(args.metrics),
                         extras=([X3] if args.bf16x3 else []) + (HF_BF16 if args.hf_bf16_flag else []))
            for i, cfg in configs
        ]
        table = _table(results)
        cpu = cpu_fingerprint(threads)["cpu"]
        print(f"\n### {cpu}, {threads} thread(s), {args.tokens} tokens, load average {load_before[0]:.1f}\n")
        print(table)
        for r in results:
            for tokens, c in r["decode_choice"].items():
                print(f"{r['config']['name']}: decode_backend='auto' at {tokens} token(s) chose {c['path']} ({c['reason']})")
        kernels = []
        if args.kernels:
            kernels = [bench_kernels(cfg, args.tokens, max(3, args.reps), seed=i) for i, cfg in configs]
            print("\n| config | rows/expert | " + " | ".join(kernels[0]["gflops"]) + " |")
            print("|---|---|" + "---|" * len(kernels[0]["gflops"]))
            for k in kernels:
                cells = " | ".join(f"{v:.0f} GFLOP/s" for v in k["gflops"].values())
                print(f"| {k['config']} | {k['rows_per_expert']} | {cells} |")
            for k in kernels:
                errs = ", ".join(f"{n} {e:.1e}" for n, e in k["max_rel_err"].items())
                print(f"{k['config']}: max relative error of expert 0's product against float64: {errs}")
        runs.append({
            "threads": threads, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "results": results, "table": table, "kernels": kernels,
        })
    meta = {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "cpu": cpu_fingerprint(args.threads[0])["cpu"],
        "quick": args.quick, "metrics": args.metrics, "bf16x3": args.bf16x3, "hf_bf16_flag": args.hf_bf16_flag, "tokens": args.tokens, "reps": args.reps, "decode_calls": args.decode_calls,
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
