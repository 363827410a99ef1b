"""Where a batch-1 sparse call's time goes: fixed per-call cost, the thread pool's hand-off, cold weights.

Issue 13 judges the int8 kernels and issue 17 the float32 ones by their batch-1 rate against torch's dense
GEMV in the same run, each call on cold weights. This script separates what such a call pays besides
streaming its bytes. Per layer shape (``--shapes``, (out, in); a 64-row layer shows the fixed cost alone)
and thread count, each cell (native kernels called directly, output preallocated) is timed three ways:

* ``cold``: a 1 GiB buffer summed (numpy, one thread) before each call, as in ``bench_int8_kernels.py``:
  weights, code, the interpreter's objects and the TLB are cold, and the pool's workers are asleep;
* ``pool``: the same, then one small native call (a 256x2048 float32 bitmap layer, untimed) just before
  the timed one: the workers are awake and polling, the shared call path (interpreter, binding, driver)
  warm, the timed layer's weights still cold. ``cold - pool`` is the hand-off and the shared cold path;
* ``warm``: back-to-back calls, no eviction: the weights stay in cache where they fit.

Cells: ``dense`` (torch ``F.linear``, float32), ``bitmap 50%`` / ``nm 2:4`` (float32 values) and
``bitmap_i8 50%`` / ``nm_i8 2:4`` / ``csr_i8 90%`` (int8 values with row scales, float32 activations).
Per cell: median and fastest wall ms and GB/s of the format's bytes; with one and two threads the
difference between them is the pool's share.

Usage:
    python benchmarks/bench_call_costs.py                  # 64x2048, 2560x2048, 11264x2048; 1 and 2 threads
    python benchmarks/bench_call_costs.py --quick          # one small shape, few calls (smoke)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import host_line  # noqa: E402
from bench_int8_kernels import build as build_int8, kernel_call as int8_call, weight_bytes  # noqa: E402
from bench_output import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CELLS = ("dense", "bitmap 50%", "nm 2:4", "bitmap_i8 50%", "nm_i8 2:4", "csr_i8 90%")
MODES = ("cold", "pool", "warm")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="64x2048,2560x2048,11264x2048", help="(out)x(in) per layer, comma separated")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--calls", type=int, default=9, help="timed calls per cell and mode")
    ap.add_argument("--evict-mib", type=int, default=1024, help="buffer summed before each cold / pool call")
    ap.add_argument("--quick", action="store_true", help="one 256x512 layer, 1 thread, 3 calls, 16 MiB eviction (smoke)")
    ap.add_argument("--out", type=Path, default=RESULTS / "call_costs.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.threads, args.calls, args.evict_mib = "256x512", "1", 3, 16
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    args.cells = tuple(c.strip() for c in args.cells.split(",") if c.strip())
    unknown = set(args.cells) - set(CELLS)
    if unknown:
        raise SystemExit(f"unknown cells {sorted(unknown)}; choose from {', '.join(CELLS)}")
    return args


def float_call(cell: str, w: torch.Tensor, x: np.ndarray, y: np.ndarray):
    """(closure running the float32-valued cell's native kernel once into y, the format's bytes)."""
    from sparseforge.formats import BitmapWeight, NMWeight
    from sparseforge.kernels import native

    nat, gen = native(), torch.Generator().manual_seed(w.shape[1])
    if cell == "nm 2:4":
        scores = torch.rand(w.shape[0], w.shape[1] // 4, 4, generator=gen)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(2, dim=2).indices, True)
        wt = NMWeight.from_dense(w, "2:4", keep.reshape(w.shape))
        a = (x, wt.values.numpy(), wt.indices.numpy(), 2, 4, None, y)
        return (lambda: nat.nm_linear(*a, check_indices=False)), wt.values.nbytes + wt.indices.nbytes
    wt = BitmapWeight.from_dense(w, torch.rand(w.shape, generator=gen) >= 0.5)
    a = (x, wt.bitmap.numpy(), wt.row_offsets.numpy(), wt.values.numpy(), None, y)
    return (lambda: nat.bitmap_linear(*a, check_indices=False)), wt.bitmap.nbytes + wt.row_offsets.nbytes + wt.values.nbytes


def pool_call():
    """A small parallel-capable native call (256x2048 float32 bitmap, 50%) that wakes the pool's workers."""
    w = torch.randn(256, 2048, generator=torch.Generator().manual_seed(0))
    fn, _ = float_call("bitmap 50%", w, np.ones((1, 2048), np.float32), np.empty((1, 256), np.float32))
    return fn


def time_mode(fn, mode: str, calls: int, evict: np.ndarray, wake) -> dict:
    """Median and fastest wall ms of fn() in `mode` (see the module docstring)."""
    fn()
    ts = []
    for _ in range(calls):
        if mode != "warm":
            evict.sum()
        if mode == "pool":
            wake()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts)}


def run(args) -> dict:
    from sparseforge.formats.memory import hugepage_backed
    from sparseforge.kernels import native

    nat = native()
    evict = hugepage_backed(torch.ones(args.evict_mib * 2**18)).numpy()
    wake = pool_call()
    rows, load_before = [], os.getloadavg()
    for out, inp in args.shapes:
        w = torch.empty(out, inp).uniform_(-1, 1, generator=torch.Generator().manual_seed(out))
        x = torch.randn(1, inp)
        xn, y = x.numpy(), np.empty((1, out), np.float32)
        dense = hugepage_backed(w.clone())
        calls = {}
        for cell in args.cells:
            if cell == "dense":
                calls[cell] = ((lambda: torch.nn.functional.linear(x, dense)), dense.numel() * 4)
            elif "_i8" in cell:
                wt = build_int8(cell, w, seed=inp)
                calls[cell] = (int8_call(cell, wt, xn, y), weight_bytes(wt))
            else:
                calls[cell] = float_call(cell, w, xn, y)
        for threads in args.threads:
            torch.set_num_threads(threads)
            nat.set_num_threads(threads)
            for mode in MODES:
                for cell, (fn, nbytes) in calls.items():
                    t = time_mode(fn, mode, args.calls, evict, wake)
                    rows.append({"shape": f"{out}x{inp}", "threads": threads, "mode": mode, "cell": cell,
                                 "mb": nbytes / 1e6, "gbs": nbytes / (t["ms"] / 1e3) / 1e9, **t})
    return {"host": host_line(), "isa": nat.isa(""), "calls": args.calls, "evict_mib": args.evict_mib,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(f"host: {result['host']}")
    print(f"isa {result['isa']}; load average before {result['loadavg_before'][0]:.2f}, after "
          f"{result['loadavg_after'][0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'shape':<12}{'thr':>4}  {'mode':<6}{'cell':<15}{'ms':>9}{'min':>9}{'MB':>8}{'GB/s':>7}")
    for r in result["rows"]:
        print(f"{r['shape']:<12}{r['threads']:>4}  {r['mode']:<6}{r['cell']:<15}{r['ms']:9.3f}{r['min_ms']:9.3f}"
              f"{r['mb']:8.2f}{r['gbs']:7.1f}")
    write_json(args.out, result, indent=2)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
