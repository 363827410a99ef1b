"""int8-valued sparse kernels at batch 1-3 against the bytes bound of issue 13, one layer at a time, one run.

Per layer shape (``--shapes``, (out, in); default the 721M Llama model's 11264x2048 fused gate/up,
2048x5632 down, 2560x2048 fused q/k/v, and 11008x4096) and thread count
(``--threads``, default 1 and 2), cells (native kernels called directly, output preallocated):

* ``dense fp32``: torch ``F.linear`` on the dense float32 weight, batch 1: its weight rate (bytes /
  time) is the bytes-bound rate;
* ``bitmap_i8 50%``, ``bitmap_i8 75%``, ``nm_i8 2:4``, ``csr_i8 90%``: int8 values with float32 row scales
  (``sparseforge.formats.quantized``), float32 activations (the default mode, ``act="float"``; on AVX512
  VNNI the fixed-point walk of ``csrc/int8.h``);
* ``bitmap_i8 ... walk=fma``: the same calls with ``SPARSEFORGE_INT8_WALK=fma`` (the float mode's FMA
  walk: the "before" of the fixed-point walk, same run; 2:4 runs the FMA walk either way);
* ``... act=int8``: the same weights with x quantized to int8 per batch row (``csrc/int8.h``
  ``I8Act::int8``; AVX512 VNNI kernels where the CPU has them). ``nm_i8 4:16 act=int8``: 75% as N:M with
  groups of 16 (4-bit positions: on AVX2 the nibbles are vpshufb controls); any ``nm_i8 N:M`` cell is accepted.

Every timed call runs on cold weights: a 1 GiB buffer is summed (numpy, one thread) before each call
(its time is not counted), as in a decode step whose model exceeds the last-level cache. Per cell: median wall ms,
weight GB/s (bytes of the stored format / time), ``% bound`` = (bytes / dense fp32 rate) / time (100% =
the format's bytes streamed at the rate torch's dense GEMV reached in the same run; target >= 90%), and
the median CPU ms per call (``time.process_time``: all threads of this process), which moves less than
wall time when other jobs share the cores, and the bound judged three ways: median wall time, fastest
call, and CPU time (``cpu % bound``: bytes at dense fp32's CPU-time rate against the cell's CPU time;
the steadiest of the three on a shared machine for one thread; for two, the worker's time is not all
counted, so the verdicts use the wall median there: take them from a quiet run). The load average
before and after is printed.

Usage:
    python benchmarks/bench_int8_kernels.py                 # 4 shapes x 1, 2 threads, batch 1 (~4 min)
    python benchmarks/bench_int8_kernels.py --batches 1,2,3
    python benchmarks/bench_int8_kernels.py --quick         # one small shape, few calls (smoke)
    python benchmarks/bench_int8_kernels.py --stack 16 --threads 2 --out benchmarks/results/int8_stack.json
                                                            # the 721M model's 64 projections at 75%, per token
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import host_line  # noqa: E402
from bench_output import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# a cell: format, sparsity, then settings (act=int8: int8 activations; walk=fma: SPARSEFORGE_INT8_WALK=fma,
# the float mode's FMA walk instead of the fixed-point one; rows=2: SPARSEFORGE_INT8_ROWS=2; isa=...: forced path)
CELLS = ("bitmap_i8 50%", "bitmap_i8 75%", "nm_i8 2:4", "csr_i8 90%", "bitmap_i8 50% walk=fma", "bitmap_i8 75% walk=fma",
         "bitmap_i8 50% act=int8", "bitmap_i8 75% act=int8", "nm_i8 2:4 act=int8", "nm_i8 4:16 act=int8")
# --compare: the FMA walk with two output rows interleaved per loop, and the int8-activation mode on the
# AVX2 path (forced ISA)
COMPARE_CELLS = ("bitmap_i8 50% walk=fma rows=2", "nm_i8 2:4 walk=fma rows=2", "bitmap_i8 50% act=int8 isa=avx2",
                 "nm_i8 2:4 act=int8 isa=avx2")
# the 721M Llama model's layers (hidden 2048, FFN 5632: fused gate/up, down, fused q/k/v) and a 7B-class one
DEFAULT_SHAPES = "11264x2048,2048x5632,2560x2048,11008x4096"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="(out)x(in) per layer, comma separated")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--calls", type=int, default=15, help="timed calls per cell (each on cold weights)")
    ap.add_argument("--cells", default=",".join(CELLS), help="cells to time, comma separated (default: all)")
    ap.add_argument("--evict-mib", type=int, default=1024, help="buffer summed before each call")
    ap.add_argument("--quick", action="store_true", help="one 1024x2816 layer, 1 thread, 5 calls, 64 MiB eviction (smoke)")
    ap.add_argument("--compare", action="store_true",
                    help="also time " + ", ".join(COMPARE_CELLS) + " (same run: before / after and the AVX2 path)")
    ap.add_argument("--stack", type=int, default=0, metavar="LAYERS",
                    help="instead: LAYERS x the 721M model's four projections (fused q/k/v, o, fused gate/up, down) "
                         "as int8 bitmap at --stack-sparsity, called in decode order; ms per token with each float-mode walk")
    ap.add_argument("--stack-sparsity", type=float, default=0.75, help="sparsity of the --stack layers (default 0.75)")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_kernels.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.threads, args.calls, args.evict_mib = "1024x2816", "1", 5, 64
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.cells = tuple(c.strip() for c in args.cells.split(",") if c.strip())
    for cell in args.cells + COMPARE_CELLS:
        weight_key(cell)  # a malformed cell fails here, before any timing
    return args


def weight_key(cell: str) -> str:
    """The weight a cell runs on: its format and sparsity (``"bitmap_i8 75%"``)."""
    fmt, sparsity = (cell.split() + [""])[:2]
    n_m = sparsity.split(":")
    is_nm = len(n_m) == 2 and all(v.isdigit() for v in n_m) and 0 < int(n_m[0]) < int(n_m[1])
    ok = {"bitmap_i8": sparsity.endswith("%"), "nm_i8": is_nm, "csr_i8": sparsity.endswith("%")}
    if not ok.get(fmt, False):
        raise SystemExit(f"cell {cell!r}: expected 'bitmap_i8 NN%', 'nm_i8 N:M' (e.g. 2:4, 4:16) or 'csr_i8 NN%' "
                         "then settings")
    return f"{fmt} {sparsity}"


def build(cell: str, w: torch.Tensor, seed: int):
    """The int8 weight of a cell: ``w`` (out, in) pruned at the cell's sparsity (random mask)."""
    from sparseforge.formats import BitmapWeight, NMWeight
    from sparseforge.formats.csr import CSRWeight

    gen = torch.Generator().manual_seed(seed)
    fmt, sparsity = weight_key(cell).split()
    if fmt == "nm_i8":
        n, m = (int(v) for v in sparsity.split(":"))
        scores = torch.rand(w.shape[0], w.shape[1] // m, m, generator=gen)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(n, dim=2).indices, True)
        return NMWeight.from_dense(w, sparsity, keep.reshape(w.shape), values_dtype=torch.int8)
    keep = torch.rand(w.shape, generator=gen) >= float(sparsity.rstrip("%")) / 100
    cls = BitmapWeight if fmt == "bitmap_i8" else CSRWeight
    return cls.from_dense(w, keep, values_dtype=torch.int8)


def weight_bytes(wt) -> int:
    names = {"BitmapWeight": ("bitmap", "row_offsets", "values", "scales"), "NMWeight": ("values", "indices", "scales"),
             "CSRWeight": ("row_ptr", "col", "values", "scales")}[type(wt).__name__]
    return sum(getattr(wt, n).numel() * getattr(wt, n).element_size() for n in names)


def kernel_call(cell: str, wt, x: np.ndarray, y: np.ndarray):
    """A closure running the cell's native kernel once into y."""
    from sparseforge.kernels import native

    nat, act = native(), ("int8" if "act=int8" in cell.split() else "float")
    isa = next((t.split("=")[1] for t in cell.split() if t.startswith("isa=")), "")
    fmt = cell.split()[0]
    if fmt == "bitmap_i8":
        a = (x, wt.bitmap.numpy(), wt.row_offsets.numpy(), wt.values.numpy(), wt.scales.numpy(), None, y)
        return lambda: nat.bitmap_i8_linear(*a, check_indices=False, act=act, isa=isa)
    if fmt == "nm_i8":
        a = (x, wt.values.numpy(), wt.indices.numpy(), wt.scales.numpy(), wt.pattern.n, wt.pattern.m, None, y)
        return lambda: nat.nm_i8_linear(*a, check_indices=False, act=act, isa=isa)
    a = (x, wt.row_ptr.numpy(), wt.col.numpy(), wt.values.numpy(), wt.scales.numpy(), None, y)
    return lambda: nat.csr_i8_linear(*a, check_indices=False)


@contextmanager
def cell_env(cell: str):
    """Inside: the environment a cell's calls run under (``rows=2``: SPARSEFORGE_INT8_ROWS=2, ``walk=fma``:
    SPARSEFORGE_INT8_WALK=fma), restored after."""
    names = {"rows": "SPARSEFORGE_INT8_ROWS", "walk": "SPARSEFORGE_INT8_WALK"}
    env = {names[t.split("=")[0]]: t.split("=")[1] for t in cell.split() if t.split("=")[0] in names}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def time_cold(fn, calls: int, evict: np.ndarray) -> dict:
    """Median wall and CPU ms of fn() over `calls` calls, each after summing `evict` (untimed). The sum runs
    in numpy, on one thread: a torch sum on two threads leaves torch's OpenMP worker spinning on the other
    core while the timed call runs, where it takes the core from the kernels' second thread."""
    fn()
    wall, cpu = [], []
    for _ in range(calls):
        evict.sum()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t1, c1 = time.perf_counter(), time.process_time()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
    return {"ms": 1e3 * statistics.median(wall), "min_ms": 1e3 * min(wall), "cpu_ms": 1e3 * statistics.median(cpu)}


def run(args) -> dict:
    from sparseforge.kernels import native
    from sparseforge.formats.memory import hugepage_backed

    nat = native()
    evict_buffer = hugepage_backed(torch.ones(args.evict_mib * 2**18))
    evict = evict_buffer.numpy()
    rows = []
    load_before = os.getloadavg()
    for out, inp in args.shapes:
        w = torch.empty(out, inp).uniform_(-1, 1, generator=torch.Generator().manual_seed(out))
        cells = args.cells + (COMPARE_CELLS if args.compare else ())
        weights = {key: build(key, w, seed=inp) for key in dict.fromkeys(weight_key(c) for c in cells)}
        dense = hugepage_backed(w.clone())
        for threads in args.threads:
            torch.set_num_threads(threads)
            nat.set_num_threads(threads)
            for batch in args.batches:
                x = torch.randn(batch, inp)
                d = time_cold(lambda: torch.nn.functional.linear(x, dense), args.calls, evict)
                dense_rate = dense.numel() * 4 / (d["ms"] / 1e3)  # bytes / s of wall time
                dense_min_rate = dense.numel() * 4 / (d["min_ms"] / 1e3)
                dense_cpu_rate = dense.numel() * 4 / max(d["cpu_ms"] / 1e3, 1e-9)  # bytes / s of CPU time
                rows.append({"shape": f"{out}x{inp}", "threads": threads, "batch": batch, "cell": "dense fp32",
                             "mb": dense.numel() * 4 / 1e6, "gbs": dense_rate / 1e9, "pct_bound": 100.0,
                             "pct_bound_min": 100.0, "pct_bound_cpu": 100.0, **d})
                xn, y = x.numpy(), np.empty((batch, out), np.float32)
                for cell in cells:
                    wt = weights[weight_key(cell)]
                    with cell_env(cell):
                        t = time_cold(kernel_call(cell, wt, xn, y), args.calls, evict)
                    nbytes = weight_bytes(wt)
                    rows.append({"shape": f"{out}x{inp}", "threads": threads, "batch": batch,
                                 "cell": cell,
                                 "mb": nbytes / 1e6, "gbs": nbytes / (t["ms"] / 1e3) / 1e9,
                                 "pct_bound": 100.0 * (nbytes / dense_rate) / (t["ms"] / 1e3),
                                 "pct_bound_min": 100.0 * (nbytes / dense_min_rate) / (t["min_ms"] / 1e3),
                                 "pct_bound_cpu": 100.0 * (nbytes / dense_cpu_rate) / max(t["cpu_ms"] / 1e3, 1e-9), **t})
    return {"host": host_line(), "int8_vnni": bool(nat.int8_vnni()), "float_walk": nat.int8_float_walk(""),
            "isa": nat.isa(""), "calls": args.calls,
            "evict_mib": args.evict_mib, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}


def targets(result: dict) -> list[str]:
    """PASS / FAIL per batch-1 cell: >= 90% of the bytes bound, by CPU time on one thread and by the wall median
    on more (a call's CPU time misses its other threads' time not yet accounted at the next scheduler tick: on
    the quiet machine two-thread calls showed CPU time equal to their wall time); the other figure beside it."""
    lines = []
    for r in result["rows"]:
        if r["cell"] == "dense fp32" or r["batch"] != 1 or any(t in r["cell"] for t in ("rows=", "isa=", "walk=")):
            continue  # the walk=fma and --compare cells are references, not the paths a call takes
        by_cpu = r["threads"] == 1
        pct, other = (r["pct_bound_cpu"], r["pct_bound"]) if by_cpu else (r["pct_bound"], r["pct_bound_cpu"])
        verdict = "PASS" if pct >= 90.0 else "FAIL"
        lines.append(f"{verdict}: {r['cell']} {r['shape']} {r['threads']} thr: {pct:.0f}% of the bytes bound by "
                     f"{'CPU time' if by_cpu else 'wall median'} ({'wall median' if by_cpu else 'CPU time'} {other:.0f}%), "
                     f"target >= 90%")
    return lines


STACK_SHAPES = ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632))  # (out, in) per decoder layer


def run_stack(args) -> dict:
    """``--stack``: every projection of ``args.stack`` decoder layers at batch 1, in order, as one "token";
    median ms per token over interleaved rounds of each float-mode walk (``SPARSEFORGE_INT8_WALK``), on the
    first thread count of ``--threads``."""
    from sparseforge.formats import BitmapWeight
    from sparseforge.kernels import native

    nat = native()
    nat.set_num_threads(args.threads[0])
    gen = torch.Generator().manual_seed(0)
    calls = []
    for _ in range(args.stack):
        for out, inp in STACK_SHAPES:
            w = torch.empty(out, inp).uniform_(-1, 1, generator=gen)
            keep = torch.rand(out, inp, generator=gen) >= args.stack_sparsity
            wt = BitmapWeight.from_dense(w, keep, values_dtype=torch.int8)
            x, y = torch.randn(1, inp, generator=gen).numpy(), np.empty((1, out), np.float32)
            calls.append((wt, kernel_call(f"bitmap_i8 {100 * args.stack_sparsity:g}%", wt, x, y)))
    nbytes = sum(weight_bytes(wt) for wt, _ in calls)
    times: dict[str, list[float]] = {"auto": [], "fma": []}
    for _ in range(max(args.calls, 3)):
        for walk in times:
            with cell_env(f"bitmap_i8 75% walk={walk}"):
                for _, fn in calls:  # one untimed token: the walk's code and the pool warm
                    fn()
                t0 = time.perf_counter()
                for _, fn in calls:
                    fn()
                times[walk].append(time.perf_counter() - t0)
    rows = [{"walk": walk, "ms": 1e3 * statistics.median(ts), "gbs": nbytes / statistics.median(ts) / 1e9}
            for walk, ts in times.items()]
    return {"host": host_line(), "float_walk": nat.int8_float_walk(""), "layers": args.stack,
            "sparsity": args.stack_sparsity, "threads": args.threads[0], "mb": nbytes / 1e6, "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stack:
        result = run_stack(args)
        print(f"host: {result['host']}")
        print(f"{result['layers']} layers x {len(STACK_SHAPES)} projections, int8 bitmap {result['sparsity']:.0%}, "
              f"{result['mb']:.0f} MB, {result['threads']} threads, batch 1:")
        for r in result["rows"]:
            print(f"  walk={r['walk']:<5} {r['ms']:8.2f} ms per token  {r['gbs']:5.1f} GB/s")
        write_json(args.out, result, indent=2)
        print(f"saved {args.out}")
        return 0
    result = run(args)
    print(f"host: {result['host']}")
    print(f"isa {result['isa']}, int8 VNNI kernels {result['int8_vnni']}, float-mode walk {result['float_walk']}; "
          f"load average before "
          f"{result['loadavg_before'][0]:.2f}, after {result['loadavg_after'][0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'shape':<12}{'thr':>4}{'B':>3}  {'cell':<34}{'ms':>8}{'min':>8}{'cpu ms':>8}{'MB':>8}{'GB/s':>7}"
          f"{'% bound':>9}{'min %':>7}{'cpu %':>7}")
    for r in result["rows"]:
        print(f"{r['shape']:<12}{r['threads']:>4}{r['batch']:>3}  {r['cell']:<34}{r['ms']:8.3f}{r['min_ms']:8.3f}"
              f"{r['cpu_ms']:8.3f}{r['mb']:8.1f}{r['gbs']:7.1f}{r['pct_bound']:8.0f}%{r['pct_bound_min']:6.0f}%"
              f"{r['pct_bound_cpu']:6.0f}%")
    for line in targets(result):
        print(line)
    write_json(args.out, result, indent=2)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
