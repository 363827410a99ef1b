"""Batch-1 bitmap walk with bf16 values and a bf16 x: time per layer against the bytes bound, one run.

A bf16 model decoding through sparse layers runs the bitmap bf16-values walk of
``csrc/bitmap_bf16dot.h`` for every projection of every token. Per shape ``(out, in)`` (defaults: one
decoder layer of the 721 M Llama of ``bench_e2e_llamacpp.py``: fused q/k/v, o_proj, fused gate+up, down)
and density, two modes:

* **cold**: a ring of weight copies larger than the last-level cache (``--ring-mb``) is walked, so every
  call streams its weight (values + bitmap) from memory: microseconds per call, GB/s of the layer's
  bytes, and the bytes bound at the rate torch's dense fp32 GEMV streams in the same run;
* **hot**: one weight called again and again (it stays in L2 / L3): the walk's compute cost, as
  nanoseconds per 64 columns per row (one thread).

Each cell also runs with ``SPARSEFORGE_AVX512_BF16=0`` (the bitmap kernels' float32 FMA walk that the
bf16 walk replaces) as the same-run baseline. ``--clock thread`` times with the thread's CPU clock (one
thread only): on a busy machine that measures the work itself, not the time the scheduler gave it.

Usage:
    python benchmarks/bench_bitmap_bf16_walk.py                      # 4 shapes x 25% / 50% kept, 2 threads
    python benchmarks/bench_bitmap_bf16_walk.py --quick              # small ring (smoke)
    python benchmarks/bench_bitmap_bf16_walk.py --threads 1 --clock thread --modes hot   # on a busy host
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
SHAPES = ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632))  # qkv, o, gate+up, down
WALKS = {"bf16 walk": "auto", "fma walk": "0"}  # cell -> SPARSEFORGE_AVX512_BF16


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="out x in, comma-separated")
    ap.add_argument("--kept", default="0.25,0.5", help="fractions of weights kept, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default="cold,hot")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: the thread's CPU time (needs --threads 1)")
    ap.add_argument("--ring-mb", type=int, default=0, help="bytes of each ring (0: twice the L3, at most 1024)")
    ap.add_argument("--quick", action="store_true", help="two small shapes, 32 MB rings, 3 rounds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread measures one thread: use --threads 1")
    if args.quick:
        args.shapes, args.rounds, args.ring_mb = "256x512,512x256", 3, args.ring_mb or 32
    if not args.ring_mb:
        args.ring_mb = min(1024, 2 * (cache_sizes().get("L3") or 2**28) // 2**20)
    if args.out is None:
        args.out = RESULTS / ("bitmap_bf16_walk.quick.json" if args.quick else "bitmap_bf16_walk.json")
    args.shape_list = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.kept_list = [float(k) for k in args.kept.split(",")]
    return args


def bitmap_ring(out: int, inp: int, kept: float, n: int) -> list:
    """``n`` copies (each in its own memory) of a bf16-valued bitmap weight ``(out, in)`` keeping ``kept`` of each
    row's largest magnitudes."""
    from sparseforge.formats import BitmapWeight

    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(0))
    k = max(1, round(kept * inp))
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().topk(k, dim=1).indices, True)
    one = BitmapWeight.from_dense(w.to(torch.bfloat16), keep)
    return [one] + [BitmapWeight.from_dense(one.to_dense(), keep) for _ in range(n - 1)]


def weight_bytes(w) -> int:
    return w.values.numel() * 2 + w.bitmap.numel()


def clock(kind: str):
    return time.thread_time if kind == "thread" else time.perf_counter


def per_call_us(fn, n: int, now) -> float:
    """n calls of fn(i), microseconds per call."""
    t0 = now()
    for i in range(n):
        fn(i)
    return (now() - t0) / n * 1e6


def with_walk(env: str, fn):
    def call(i):
        os.environ["SPARSEFORGE_AVX512_BF16"] = env
        try:
            return fn(i)
        finally:
            os.environ.pop("SPARSEFORGE_AVX512_BF16")
    return call


def torch_fp32_gbps(out: int, inp: int, mbytes: int, rounds: int, now) -> float:
    """The rate torch's fp32 GEMV streams ``(out, in)`` weights from a ring of ``mbytes`` (median of rounds)."""
    one = out * inp * 4
    ring = [torch.randn(out, inp) for _ in range(max(2, mbytes * 2**20 // one))]
    x = torch.randn(1, inp)
    fn = lambda i: F.linear(x, ring[i % len(ring)])  # noqa: E731
    per_call_us(fn, len(ring), now)
    us = statistics.median(per_call_us(fn, len(ring), now) for _ in range(rounds))
    return one / us / 1e3


def measure(shape, kept: float, mode: str, args, now) -> list[dict]:
    from sparseforge.ops import BoundLinear

    out, inp = shape
    n = max(2, args.ring_mb * 2**20 // weight_bytes(bitmap_ring(out, inp, kept, 1)[0])) if mode == "cold" else 1
    ring = bitmap_ring(out, inp, kept, n)
    one = ring[0]
    bound = [BoundLinear(w) for w in ring]
    x = torch.randn(1, inp).bfloat16().float()  # bf16 values, as a bf16 model's activations
    calls = len(ring) if mode == "cold" else max(20, int(2e8 // (out * inp)))
    cells = {name: with_walk(env, lambda i: bound[i % len(bound)](x)) for name, env in WALKS.items()}
    for fn in cells.values():
        per_call_us(fn, calls, now)
    samples: dict[str, list[float]] = {name: [] for name in cells}
    for _ in range(args.rounds):
        for name, fn in cells.items():
            samples[name].append(per_call_us(fn, calls, now))
    nbytes = weight_bytes(one)
    rows = []
    for name, s in samples.items():
        us = statistics.median(s)
        rows.append({"shape": f"{out}x{inp}", "kept": kept, "mode": mode, "cell": name, "us": us,
                     "gbps": nbytes / us / 1e3, "ns_per_64_cols": us * 1e3 / (out * inp / 64) * args.threads,
                     "weight_bytes": nbytes, "samples_us": s})
    return rows


def verdicts(rows: list[dict], gemv: dict[str, float]) -> list[str]:
    """Per cold shape and density: does the bf16 walk stream its bytes at >= 95% of torch's fp32 GEMV rate (issue 17's
    batch-1 target), and how it compares with the FMA walk."""
    lines = []
    for r in rows:
        rate = gemv.get(r["shape"])
        if r["mode"] != "cold" or r["cell"] != "bf16 walk" or not rate:
            continue
        fma = next(f for f in rows if f["cell"] == "fma walk" and (f["shape"], f["kept"], f["mode"]) == (r["shape"], r["kept"], "cold"))
        ok = r["gbps"] >= 0.95 * rate
        lines.append(f"{'PASS' if ok else 'FAIL'}: {r['shape']} {r['kept']:.0%} kept: the bf16 walk streams {r['gbps']:.1f} GB/s, "
                     f"{r['gbps'] / rate:.2f}x torch fp32 GEMV's {rate:.1f} (target >= 0.95); {fma['us'] / r['us']:.2f}x the FMA walk")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    from sparseforge import kernels

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    now = clock(args.clock)
    rows, gemv = [], {}
    with kernels.sparse_threads(args.threads):
        for shape in args.shape_list:
            if "cold" in args.modes:
                with torch.inference_mode():
                    torch.set_num_threads(args.threads)
                    gemv[f"{shape[0]}x{shape[1]}"] = torch_fp32_gbps(*shape, args.ring_mb, args.rounds, now)
                    torch.set_num_threads(1)
            for kept in args.kept_list:
                for mode in args.modes.split(","):
                    with torch.inference_mode():
                        rows += measure(shape, kept, mode, args, now)
    print(f"batch 1, bf16 values and x, {args.threads} thread(s), clock {args.clock}; CPU {host_line()}")
    print("| shape | kept | mode | cell | us/call | GB/s | ns per 64 cols x threads | bytes bound us (torch fp32 GEMV rate) |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        rate = gemv.get(r["shape"])
        bound = f"{r['weight_bytes'] / rate / 1e3:.1f} ({rate:.1f} GB/s)" if rate and r["mode"] == "cold" else "-"
        print(f"| {r['shape']} | {r['kept']:.0%} | {r['mode']} | {r['cell']} | {r['us']:.1f} | {r['gbps']:.1f} | "
              f"{r['ns_per_64_cols']:.2f} | {bound} |")
    lines = verdicts(rows, gemv)
    print("\n".join(lines))
    write_json(args.out, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                          "host": host_line(), "torch_fp32_gemv_gbps": gemv, "rows": rows, "verdicts": lines})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
