"""Dense bf16 GEMV at batch 1: sparseforge's native kernel vs torch ``F.linear`` in bf16 and fp32, one run.

The decode step of a bf16 model is a chain of batch-1 products whose weights stream from memory, so
what counts is the rate the weight bytes stream at. Per shape ``(out, in)`` (defaults: the 721 M Llama
of ``bench_e2e_llamacpp.py``: o_proj / fused gate+up / down / a 4096-row lm_head-sized product) a ring of
weight copies larger than the last-level cache (``--ring-mb`` per dtype, default twice the L3, capped
at 1 GiB) is walked so every call reads its weight from memory. Cells, interleaved round by round:

* ``ours <kernel>``: :func:`sparseforge.ops.dense_bf16.BoundDenseBf16` on the kernel this CPU runs
  (``avx512_bf16``: vdpbf16ps), and ``ours avx512`` (the widening kernel) where the CPU has both;
* ``torch bf16``: ``F.linear`` on bf16 weights and activations (what the engine used before);
* ``torch fp32``: ``F.linear`` on float32 weights: the streaming rate torch's GEMV reaches here.

Per cell: median microseconds per call and GB/s of weight bytes. The verdict: our kernel streams at
>= 90% of torch's fp32 GEMV rate on every shape (same run).

Usage:
    python benchmarks/bench_bf16_gemv.py                # 4 shapes, 2 threads (~1 min)
    python benchmarks/bench_bf16_gemv.py --quick        # small shapes (smoke)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import cache_sizes, host_line  # noqa: E402
from bench_output import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((2048, 2048), (11264, 2048), (2048, 5632), (4096, 2048))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="out x in, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ring-mb", type=int, default=0, help="weight bytes per dtype ring (0: twice the L3, at most 1024)")
    ap.add_argument("--quick", action="store_true", help="two small shapes, 64 MB rings, 3 rounds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.ring_mb, args.rounds = "512x512,700x333", 64, 3
    if args.ring_mb <= 0:
        args.ring_mb = min(1024, 2 * cache_sizes().get("L3", 2**28) // 2**20)
    if args.out is None:
        args.out = RESULTS / ("bf16_gemv.quick.json" if args.quick else "bf16_gemv.json")
    args.shape_list = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    return args


def _ring(out: int, inp: int, dtype: torch.dtype, mbytes: int) -> list[torch.Tensor]:
    one = out * inp * torch.finfo(dtype).bits // 8
    n = max(2, mbytes * 2**20 // one)
    g = torch.Generator().manual_seed(0)
    return [torch.randn(out, inp, generator=g).to(dtype) for _ in range(n)]


def _per_call_us(fn, n: int) -> float:
    """One walk of the ring (n calls), microseconds per call."""
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e6


def cells_for(shape, args) -> dict:
    from sparseforge.ops.dense_bf16 import BoundDenseBf16, dense_bf16_kernel

    out, inp = shape
    w16, w32 = _ring(out, inp, torch.bfloat16, args.ring_mb), _ring(out, inp, torch.float32, args.ring_mb)
    x16 = torch.randn(1, inp).bfloat16()
    x32 = x16.float()
    bound = [BoundDenseBf16(w) for w in w16]
    kernel = dense_bf16_kernel()
    cells = {f"ours {kernel}": (lambda i: bound[i % len(bound)](x16), len(w16), 2),
             "torch bf16": (lambda i: F.linear(x16, w16[i % len(w16)]), len(w16), 2),
             "torch fp32": (lambda i: F.linear(x32, w32[i % len(w32)]), len(w32), 4)}
    if kernel == "avx512_bf16":
        def widening(i):
            os.environ["SPARSEFORGE_AVX512_BF16"] = "0"
            try:
                return bound[i % len(bound)](x16)
            finally:
                os.environ.pop("SPARSEFORGE_AVX512_BF16")
        cells["ours avx512 (widening)"] = (widening, len(w16), 2)
    for fn, n, _ in cells.values():  # warm-up: one walk each
        _per_call_us(fn, n)
    samples: dict[str, list[float]] = {name: [] for name in cells}
    for _ in range(args.rounds):
        for name, (fn, n, _) in cells.items():
            samples[name].append(_per_call_us(fn, n))
    rows = []
    for name, (_, _, elem) in cells.items():
        us = statistics.median(samples[name])
        rows.append({"shape": f"{out}x{inp}", "cell": name, "us": us, "gbps": out * inp * elem / us / 1e3,
                     "samples_us": samples[name]})
    return {"rows": rows}


def verdicts(rows: list[dict]) -> list[str]:
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["cell"]: r for r in rows if r["shape"] == shape}
        ours = next((r for k, r in by.items() if k.startswith("ours") and "widening" not in k), None)
        fp32, bf16 = by.get("torch fp32"), by.get("torch bf16")
        if ours and fp32:
            ok = ours["gbps"] >= 0.9 * fp32["gbps"]
            lines.append(f"{'PASS' if ok else 'FAIL'}: {shape} ours streams {ours['gbps']:.1f} GB/s >= 90% of torch fp32 GEMV's "
                         f"{fp32['gbps']:.1f} ({ours['gbps'] / fp32['gbps']:.2f}x); "
                         f"{bf16['us'] / ours['us']:.2f}x faster than torch bf16")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    from sparseforge import kernels

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    rows = []
    for shape in args.shape_list:
        rows += cells_for(shape, args)["rows"]
    print(f"batch 1, {args.threads} threads, rings of {args.ring_mb} MB per dtype, median of {args.rounds} walks; "
          f"CPU {host_line()}; load {os.getloadavg()[0]:.1f}")
    print("| shape (out x in) | cell | us / call | GB/s |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['cell']} | {r['us']:.1f} | {r['gbps']:.1f} |")
    lines = verdicts(rows)
    print("\n".join(lines))
    write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "host": host_line(), "rows": rows,
                          "loadavg": os.getloadavg(), "verdicts": lines})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
