"""Activation-sparsity kernel benchmark: the sparse-input GEMV against its bytes bound and torch dense.

Stack: ``--layers`` linear layers alternating (out, in) = (ffn, hidden) and (hidden, ffn) (default 8
x 4096/11008, as ``bench_kernels.py``: 1.44 GB in fp32, far beyond the L3), each run through
:class:`sparseforge.activation.SparseInputLinear`'s op (``sparseforge.ops.sparse_input``) with its
weight stored input-channel-major ``(in, out)``. Every layer gets its own random N(0, 1) input, and a
threshold equal to the ``s``-quantile of that input's magnitudes, so exactly ``s`` of its input
channels are skipped (activation sparsity 0 / 25 / 40 / 50 / 65 / 80 %).

Per weight dtype (fp32, bf16), batch 1, reported per cell: median ms per pass of the stack, the
bytes bound ``(1 - s) x dense-layout time`` where the dense-layout time is the faster of torch dense
(``F.linear`` on the usual ``(out, in)`` weight) and our own ``s = 0`` pass (both read every byte),
the cell's fraction of that bound (100% = time falls exactly with the skipped bytes), and the
speedup over torch dense of the same dtype measured in the same run. Every cell (torch and ours)
runs at ``--threads`` threads and at 1, and the faster counts (on a loaded machine torch's spinning
OpenMP workers, or a descheduled kernel thread, can slow the multi-threaded run several times). Batch ``--prefill`` (default
64): torch dense vs the GEMM paths over the same ``(in, out)`` weights (native masked GEMM, and
torch's matmul on the masked input, the default of ``SparseInputLinear`` for many rows).

Weight x activation sparsity (``--weight-sparsity``, default 0.5; 0 skips it): the same layers with
that fraction of each weight pruned at random, stored in the column bitmap format
(:class:`sparseforge.formats.colbitmap.ColumnBitmapWeight`, run by the native kernel of
:mod:`sparseforge.ops.column_sparse` through views checked once, as ``ColumnSparseLinear`` runs it),
at activation sparsity ``--col-sparsities`` (default 0 / 25 / 50 / 65 %). Its bytes bound is
``(1 - s_act) x (column-format bytes / dense bytes) x dense-layout time`` (the format's bytes: kept
values, the bitmap and the block pointers); ``vs torch dense`` compares with torch's dense layer of
the same dtype. At ``--prefill`` rows the decoded-panel GEMM over the same column layout (and, for
bf16 values, the bf16 product on the best bf16 path: AMX / avx512_bf16) runs against torch dense in
float32 and in bf16 on the same pruned weights, with the union of active channels (the channels the
batch reads) printed. On a CPU whose batch-1 walk is ``avx512_vbmi2`` (bf16 values expanded by
``vpexpandw``, ``column_sparse_walk``), the bf16 column rows are timed again with the plain AVX-512
walk (``SPARSEFORGE_VBMI2=0``) in the same run, kernel ``column GEMV (weight 50%), avx512 walk``.

int8 values in the column layout (``--sections int8``; int8 ``q`` plus one float32 scale per output
row, as ``ColumnSparseLinear`` keeps a pruned + int8 layer): the same pruned layers, batch 1 at
activation sparsity ``--col-sparsities`` and batch ``--prefill`` at 0 / 50 %, against torch dense
fp32 and bf16 on the same pruned weights and against our column layout with float32 values, all in
the same run. Its bytes bound is ``(1 - s_act) x (int8 column bytes / fp32 dense bytes) x torch
fp32 time`` at batch 1.

``--sections`` picks what runs (default all: ``input`` = the sparse-input GEMV and its prefill rows,
``column`` = the column-format rows per dtype, ``int8`` = the int8 column rows).

The streaming bandwidth (torch ``sum`` of a large fp32 array) is measured before and after and
printed beside the figures. The machine this is written on is shared with other jobs: read ratios
measured in one run, not absolute times.

Usage:
    python benchmarks/bench_activation_kernels.py            # 8 x 4096/11008 (several minutes)
    python benchmarks/bench_activation_kernels.py --quick    # 2 x 1024/2816, short timing (smoke)
    python benchmarks/bench_activation_kernels.py --quick --cpu-time   # one thread, CPU-time clock (shared host)
    python benchmarks/bench_activation_kernels.py --layers 2 --sparsities 0,0.5
    python benchmarks/bench_activation_kernels.py --sections int8 --layers 4   # the int8 column cells only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_output import write_json  # noqa: E402
from bench_timing import time_fn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("input", "column", "int8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--sparsities", default="0,0.25,0.4,0.5,0.65,0.8")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--prefill", type=int, default=64, help="batch of the prefill rows (0: skip)")
    p.add_argument("--weight-sparsity", type=float, default=0.5, help="pruned fraction for the column-format rows (0: skip)")
    p.add_argument("--col-sparsities", default="0,0.25,0.5,0.65", help="activation sparsities of the column-format rows")
    p.add_argument("--sections", default="input,column,int8", help="comma list of input, column, int8 (module doc)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per cell (5..40 passes)")
    p.add_argument("--bw-mib", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="2 layers of 1024/2816, short timing")
    p.add_argument("--cpu-time", action="store_true",
                   help="one thread, timed by the thread's CPU time (robust on a shared, loaded machine)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.ffn, args.budget, args.bw_mib = 2, 1024, 2816, 0.3, 128
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.col_sparsities = [float(s) for s in args.col_sparsities.split(",")]
    if not 0.0 <= args.weight_sparsity < 1.0:
        p.error("--weight-sparsity must be in [0, 1)")
    args.sections = set(args.sections.split(","))
    if not args.sections or args.sections - set(SECTIONS):
        p.error(f"--sections takes a comma list of {', '.join(SECTIONS)}")
    args.dtypes = args.dtypes.split(",")
    if set(args.dtypes) - {"fp32", "bf16"}:
        p.error("dtypes are fp32 and/or bf16")
    return args


def bandwidth_gbs(mib: int) -> float:
    """Streaming read bandwidth: torch ``sum`` of a ``mib`` MiB fp32 array, median of 9."""
    a = torch.ones(mib * 2**18, dtype=torch.float32)
    ts = []
    for _ in range(9):
        t0 = time.perf_counter()
        a.sum()
        ts.append(time.perf_counter() - t0)
    return a.numel() * 4 / statistics.median(ts) / 1e9


def time_cpu(fn, budget: float) -> dict:
    """Median CPU time of the calling thread per fn() (``--cpu-time``: one thread, so the thread does
    all the work); a descheduled thread accrues none, which makes this robust on a shared machine."""
    fn()
    t0 = time.thread_time()
    fn()
    first = time.thread_time() - t0
    n = max(5, min(40, int(budget / max(first, 1e-6)) + 1))
    ts = []
    for _ in range(n):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return {"ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "passes": n, "clock": "thread cpu time"}


def time_best(fn, budget: float, threads: int, set_threads) -> dict:
    """time_fn at ``threads`` threads and at 1 (``set_threads(n)`` switches), the faster kept: on a
    loaded machine a multi-threaded run can be far slower (torch's spinning OpenMP workers, a
    kernel thread descheduled). Applied alike to torch and to our kernels. ``threads == 0`` means
    ``--cpu-time``: one thread, timed by :func:`time_cpu`."""
    if threads == 0:
        set_threads(1)
        return dict(time_cpu(fn, budget), threads_used=1)
    best = None
    for n in sorted({threads, 1}, reverse=True):
        set_threads(n)
        t = dict(time_fn(fn, budget), threads_used=n)
        best = t if best is None or t["ms"] < best["ms"] else best
    set_threads(threads)
    return best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args) -> dict:
    from sparseforge import kernels
    from sparseforge.ops.sparse_input import sparse_input_linear

    def time_torch(fn, budget, threads):
        return time_best(fn, budget, 0 if args.cpu_time else threads, torch.set_num_threads)

    def time_ours(fn, budget, threads):
        return time_best(fn, budget, 0 if args.cpu_time else threads, kernels.set_num_threads)

    if args.cpu_time:
        args.threads = 1
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    shapes = [(args.ffn, args.hidden) if k % 2 == 0 else (args.hidden, args.ffn) for k in range(args.layers)]
    meta = {"layers": shapes, "threads": args.threads, "isa": kernels.isa(), "cpu": cpu_name(),
            "clock": "thread cpu time" if args.cpu_time else "wall",
            "torch": torch.__version__, "load_avg_start": os.getloadavg()}
    print(f"# {args.layers} layers {shapes[0]}...; isa={meta['isa']}, threads={args.threads}; {meta['cpu']}", flush=True)
    bw0 = bandwidth_gbs(args.bw_mib)
    print(f"# streaming bandwidth before: {bw0:.1f} GB/s; load average {meta['load_avg_start']}", flush=True)
    gen = torch.Generator().manual_seed(0)
    dense32 = [torch.randn(o, i, generator=gen) / i**0.5 for o, i in shapes]  # (out, in)
    xs = [torch.randn(1, i, generator=gen) for _, i in shapes]  # each layer's own input
    rows = []
    for dt_name in args.dtypes if args.sections & {"input", "column"} else []:
        dtype = torch.float32 if dt_name == "fp32" else torch.bfloat16
        dense = [w.to(dtype) for w in dense32]
        stored = [w.t().contiguous() for w in dense]  # (in, out): input-channel-major

        def torch_dense(dense=dense, dtype=dtype):
            with torch.no_grad():
                for w, x in zip(dense, xs):
                    torch.nn.functional.linear(x.to(dtype), w)

        t_dense = time_torch(torch_dense, args.budget, args.threads)
        rows.append({"dtype": dt_name, "batch": 1, "kernel": "torch dense", "sparsity": 0.0, **t_dense})
        ours = {}
        for s in args.sparsities if "input" in args.sections else []:
            thr = [torch.tensor([float(torch.quantile(x.abs(), s))]) if s > 0 else torch.zeros(1) for x in xs]

            def sparse(stored=stored, thr=thr):
                for w_t, x, t in zip(stored, xs, thr):
                    sparse_input_linear(x, w_t, t)

            ours[s] = time_ours(sparse, args.budget, args.threads)
        dense_layout = min(t_dense["ms"], ours.get(0.0, t_dense)["ms"])
        for s, t in ours.items():
            bound = (1 - s) * dense_layout
            rows.append({"dtype": dt_name, "batch": 1, "kernel": "sparse-input GEMV", "sparsity": s, **t,
                         "bound_ms": bound, "of_bound": bound / t["ms"], "vs_torch_dense": t_dense["ms"] / t["ms"]})
            print(f"{dt_name} s={s:.0%}: {t['ms']:.2f} ms, bound {bound:.2f} ms ({bound / t['ms']:.0%}), "
                  f"{t_dense['ms'] / t['ms']:.2f}x torch dense ({t_dense['ms']:.2f} ms)", flush=True)
        if args.prefill and "input" in args.sections:
            xb = [torch.randn(args.prefill, i, generator=gen) for _, i in shapes]
            base = None  # torch dense (its time does not depend on the input's sparsity)
            for s in (0.0, 0.5):
                thr = [torch.tensor([float(torch.quantile(x.abs(), s))]) if s > 0 else torch.zeros(1) for x in xb]
                cells = {"torch dense": lambda: [torch.nn.functional.linear(x.to(dtype), w) for w, x in zip(dense, xb)]}
                for algo in ("gemm", "torch"):
                    cells[f"same layout ({'native GEMM' if algo == 'gemm' else 'torch matmul'})"] = (
                        lambda algo=algo: [sparse_input_linear(x, w_t, t, algo=algo) for w_t, x, t in zip(stored, xb, thr)])
                for name, fn in cells.items():
                    if name == "torch dense" and s > 0:
                        continue
                    with torch.no_grad():
                        timer = time_torch if "torch" in name else time_ours
                        t = timer(fn, args.budget, args.threads)
                    base = t["ms"] if name == "torch dense" else base
                    rows.append({"dtype": dt_name, "batch": args.prefill, "kernel": name, "sparsity": s, **t,
                                 "vs_torch_dense": base / t["ms"] if base else None})
                    print(f"{dt_name} batch {args.prefill} s={s:.0%} {name}: {t['ms']:.1f} ms "
                          f"({base / t['ms']:.2f}x torch dense)", flush=True)
        if args.weight_sparsity > 0 and "column" in args.sections:
            rows += column_rows(args, dt_name, dtype, dense32, xs, t_dense, dense_layout, gen, time_torch, time_ours)
    if args.weight_sparsity > 0 and "int8" in args.sections:
        rows += int8_column_rows(args, dense32, xs, gen, time_torch, time_ours)
    bw1 = bandwidth_gbs(args.bw_mib)
    meta.update({"bandwidth_gbs": [bw0, bw1], "load_avg_end": os.getloadavg()})
    return {"meta": meta, "rows": rows}


def column_rows(args, dt_name, dtype, dense32, xs, t_dense, dense_layout, gen, time_torch, time_ours) -> list[dict]:
    """The column-format rows of one dtype (module doc): batch 1 at each activation sparsity against
    its bytes bound and torch dense, and the prefill GEMM over the same layout against torch dense."""
    from sparseforge.formats.colbitmap import ColumnBitmapWeight
    from sparseforge.kernels import native
    from sparseforge.ops.column_sparse import kernel_args

    ws = args.weight_sparsity
    pruned = [w * (torch.rand(w.shape, generator=gen) >= ws) for w in dense32]  # (out, in), ws zeros
    cols = [ColumnBitmapWeight.from_dense(w.to(dtype)) for w in pruned]
    args_of = [kernel_args(c.bitmap, c.block_ptr, c.values, c.shape[0]) for c in cols]  # checked once
    dense_bytes = sum(w.numel() * w.element_size() for w in (d.to(dtype) for d in dense32))
    ratio = sum(c.nbytes for c in cols) / dense_bytes
    label = f"column GEMV (weight {ws:.0%})"
    print(f"# {dt_name}: column format {ratio:.3f} of the dense bytes at weight sparsity {ws:.0%}", flush=True)
    rows = []
    walk = native().column_sparse_walk("")
    # bf16 values on a VBMI2 CPU: the plain AVX-512 walk (SPARSEFORGE_VBMI2=0) timed beside it in the same run
    walks = [(walk, None)] + ([("avx512", "0")] if dt_name == "bf16" and walk == "avx512_vbmi2" else [])
    for s in args.col_sparsities:
        thr = [torch.tensor([float(torch.quantile(x.abs(), s))]) if s > 0 else torch.zeros(1) for x in xs]
        outs = [torch.empty(1, c.shape[0]) for c in cols]

        def run_cols(thr=thr, outs=outs):
            for (kernel, *views), x, t, y in zip(args_of, xs, thr, outs):
                kernel(x.numpy(), *views, t.numpy(), None, y.numpy())

        for walk_name, setting in walks:
            before = os.environ.get("SPARSEFORGE_VBMI2")
            if setting is not None:
                os.environ["SPARSEFORGE_VBMI2"] = setting
            try:
                t = time_ours(run_cols, args.budget, args.threads)
            finally:
                if setting is not None:
                    os.environ.pop("SPARSEFORGE_VBMI2") if before is None else os.environ.__setitem__("SPARSEFORGE_VBMI2", before)
            bound = (1 - s) * ratio * dense_layout
            name = label if walk_name == walk else f"{label}, {walk_name} walk"
            rows.append({"dtype": dt_name, "batch": 1, "kernel": name, "walk": walk_name, "sparsity": s,
                         "weight_sparsity": ws, **t, "bytes_ratio": ratio, "bound_ms": bound, "of_bound": bound / t["ms"],
                         "vs_torch_dense": t_dense["ms"] / t["ms"]})
            print(f"{dt_name} weight {ws:.0%} + act {s:.0%} ({walk_name} walk): {t['ms']:.2f} ms, bound {bound:.2f} ms "
                  f"({bound / t['ms']:.0%}), {t_dense['ms'] / t['ms']:.2f}x torch dense", flush=True)
    if args.prefill:
        rows += column_prefill_rows(args, dt_name, dtype, pruned, cols, args_of, gen, time_torch, time_ours)
    return rows


def column_prefill_rows(args, dt_name, dtype, pruned, cols, args_of, gen, time_torch, time_ours) -> list[dict]:
    """Batch ``--prefill`` over the column layout against torch dense on the same pruned weights, in
    float32 and in bf16 (torch's bf16 ``F.linear`` runs on AMX where the CPU has it), in the same run:
    the float32 decoded-panel GEMM and, for bf16 values, the bf16 product (``compute_dtype=bfloat16``,
    the best bf16 path). ``union`` is the fraction of channels active in at least one of the rows:
    only the others are skipped (never read) at this batch."""
    from sparseforge import kernels
    from sparseforge.kernels import native

    n = args.prefill
    xb = [torch.randn(n, c.shape[1], generator=gen) for c in cols]
    bases = {}
    with torch.no_grad():
        for base_dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            ws_ = [w.to(dtype).to(base_dt) for w in pruned]  # the stored weights, in the baseline's dtype
            xs_ = [x.to(base_dt) for x in xb]
            bases[name] = time_torch(lambda ws_=ws_, xs_=xs_: [torch.nn.functional.linear(x, w) for w, x in zip(ws_, xs_)],
                                     args.budget, args.threads)
            print(f"{dt_name} batch {n} torch dense {name} (pruned weights): {bases[name]['ms']:.2f} ms", flush=True)
    rows = [{"dtype": dt_name, "batch": n, "kernel": f"torch dense {k} (pruned weights)", "sparsity": 0.0, **v}
            for k, v in bases.items()]
    ws = args.weight_sparsity
    kernels_of = {"column layout GEMM fp32": lambda k, views, x, t, y: k(x, *views, t, None, y, "", "gemm")}
    if dtype == torch.bfloat16:
        bf16 = native().column_sparse_linear_bf16
        kernels_of[f"column layout bf16 ({kernels.bf16_path()})"] = lambda k, views, x, t, y: bf16(x, *views, t, None, y, "")
    for s in (0.0, 0.5):
        thr = [torch.tensor([float(torch.quantile(x.abs(), s))]) if s > 0 else torch.zeros(1) for x in xb]
        union = sum(float((x.abs() > t).any(0).float().sum()) for x, t in zip(xb, thr)) / sum(x.shape[1] for x in xb)
        outs = [torch.empty(n, c.shape[0]) for c in cols]
        for label, call in kernels_of.items():
            def run_cols(thr=thr, outs=outs, call=call):
                for (kernel, *views), x, t, y in zip(args_of, xb, thr, outs):
                    call(kernel, views, x.numpy(), t.numpy(), y.numpy())

            t = time_ours(run_cols, args.budget, args.threads)
            vs = {f"vs_torch_dense_{k}": v["ms"] / t["ms"] for k, v in bases.items()}
            rows.append({"dtype": dt_name, "batch": n, "kernel": f"{label} (weight {ws:.0%})", "sparsity": s,
                         "weight_sparsity": ws, "union": union, **t, "vs_torch_dense": vs[f"vs_torch_dense_{dt_name}"], **vs})
            print(f"{dt_name} batch {n} weight {ws:.0%} + act {s:.0%} (union {union:.1%}) {label}: {t['ms']:.2f} ms, "
                  f"{vs['vs_torch_dense_fp32']:.2f}x torch fp32, {vs['vs_torch_dense_bf16']:.2f}x torch bf16", flush=True)
    return rows


def int8_column_rows(args, dense32, xs, gen, time_torch, time_ours) -> list[dict]:
    """The int8 column-layout cells (module doc): batch 1 at each ``--col-sparsities`` and batch
    ``--prefill`` at 0 / 50 %, against torch dense fp32 / bf16 on the same pruned weights and our
    column layout with float32 values, in the same run."""
    from sparseforge.formats.colbitmap import ColumnBitmapWeight
    from sparseforge.kernels import native
    from sparseforge.ops.column_sparse import kernel_args

    ws = args.weight_sparsity
    pruned = [w * (torch.rand(w.shape, generator=gen) >= ws) for w in dense32]  # (out, in), ws zeros
    layouts = {"fp32": [ColumnBitmapWeight.from_dense(w) for w in pruned],
               "int8": [ColumnBitmapWeight.from_dense(w, values_dtype=torch.int8) for w in pruned]}
    args_of = {k: [kernel_args(c.bitmap, c.block_ptr, c.values, c.shape[0], c.scales) for c in cols]
               for k, cols in layouts.items()}  # checked once
    dense_bytes = sum(w.numel() * 4 for w in pruned)
    ratio = {k: sum(c.nbytes for c in cols) / dense_bytes for k, cols in layouts.items()}
    print(f"# int8 column layout: {ratio['int8']:.3f} of the fp32 dense bytes at weight sparsity {ws:.0%} "
          f"(fp32 values: {ratio['fp32']:.3f})", flush=True)
    rows = []
    for batch in (1, args.prefill) if args.prefill else (1,):
        xb = xs if batch == 1 else [torch.randn(batch, w.shape[1], generator=gen) for w in pruned]
        bases = {}
        with torch.no_grad():
            for base_dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                ws_ = [w.to(base_dt) for w in pruned]
                xs_ = [x.to(base_dt) for x in xb]
                bases[name] = time_torch(lambda ws_=ws_, xs_=xs_: [torch.nn.functional.linear(x, w) for w, x in zip(ws_, xs_)],
                                         args.budget, args.threads)
                del ws_
        rows += [{"section": "int8", "dtype": k, "batch": batch, "kernel": f"torch dense {k} (int8 cells' pruned weights)",
                  "sparsity": 0.0, **v} for k, v in bases.items()]
        print(f"batch {batch} torch dense (pruned weights): fp32 {bases['fp32']['ms']:.2f} ms, "
              f"bf16 {bases['bf16']['ms']:.2f} ms", flush=True)
        for s in args.col_sparsities if batch == 1 else (0.0, 0.5):
            thr = [torch.tensor([float(torch.quantile(x.abs(), s))]) if s > 0 else torch.zeros(1) for x in xb]
            outs = [torch.empty(batch, w.shape[0]) for w in pruned]
            times = {}
            for values in ("fp32", "int8"):
                def run_cols(thr=thr, outs=outs, kernels_=args_of[values]):
                    for (kernel, *views), x, t, y in zip(kernels_, xb, thr, outs):
                        kernel(x.numpy(), *views, t.numpy(), None, y.numpy())

                times[values] = time_ours(run_cols, args.budget, args.threads)
            for values, t in times.items():
                row = {"section": "int8", "dtype": values, "batch": batch, "kernel": f"colbitmap {values} values (weight {ws:.0%})",
                       "sparsity": s, "weight_sparsity": ws, **t, "bytes_ratio": ratio[values],
                       "vs_torch_dense": bases["fp32"]["ms"] / t["ms"],
                       "vs_torch_dense_fp32": bases["fp32"]["ms"] / t["ms"],
                       "vs_torch_dense_bf16": bases["bf16"]["ms"] / t["ms"]}
                if values == "int8":
                    row["vs_fp32_values"] = times["fp32"]["ms"] / t["ms"]
                if batch == 1:
                    row["bound_ms"] = (1 - s) * ratio[values] * bases["fp32"]["ms"]
                    row["of_bound"] = row["bound_ms"] / t["ms"]
                rows.append(row)
            i8 = times["int8"]["ms"]
            print(f"batch {batch} weight {ws:.0%} + act {s:.0%}: int8 {i8:.2f} ms, fp32 values {times['fp32']['ms']:.2f} ms "
                  f"({times['fp32']['ms'] / i8:.2f}x); int8 {bases['fp32']['ms'] / i8:.2f}x torch fp32, "
                  f"{bases['bf16']['ms'] / i8:.2f}x torch bf16", flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"CPU: {m['cpu']}; isa {m['isa']}; {m['threads']} threads; stack {len(m['layers'])} x {m['layers'][0]}; "
             f"streaming bandwidth {m['bandwidth_gbs'][0]:.1f} / {m['bandwidth_gbs'][1]:.1f} GB/s (before / after); "
             f"load average {m['load_avg_start'][0]:.1f} at start", "",
             "| dtype | batch | kernel | act. sparsity | ms (median) | bytes bound ms | % of bound | vs torch dense |",
             "|---|---|---|---|---|---|---|---|"]
    int8 = []
    for r in result["rows"]:
        if r.get("section") == "int8":
            int8.append(r)
            continue
        bound = f"{r['bound_ms']:.2f}" if "bound_ms" in r else ""
        frac = f"{r['of_bound']:.0%}" if "of_bound" in r else ""
        vs = f"{r['vs_torch_dense']:.2f}x" if r.get("vs_torch_dense") else ""
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['kernel']} | {r['sparsity']:.0%} | {r['ms']:.2f} | {bound} | {frac} | {vs} |")
    if int8:
        lines += ["", "int8 values in the column layout (same pruned weights; torch dense on them in fp32 and bf16):", "",
                  "| batch | values | act. sparsity | ms (median) | % of bytes bound | vs torch fp32 | vs torch bf16 "
                  "| int8 vs fp32 values |", "|---|---|---|---|---|---|---|---|"]
        for r in int8:
            if not r["kernel"].startswith("colbitmap "):  # a baseline: torch dense on the pruned weights
                lines.append(f"| {r['batch']} | torch dense {r['dtype']} | - | {r['ms']:.2f} | | | | |")
                continue
            frac = f"{r['of_bound']:.0%}" if "of_bound" in r else ""
            vs8 = f"{r['vs_fp32_values']:.2f}x" if "vs_fp32_values" in r else ""
            lines.append(f"| {r['batch']} | {r['dtype']} | {r['sparsity']:.0%} | {r['ms']:.2f} | {frac} | "
                         f"{r['vs_torch_dense_fp32']:.2f}x | {r['vs_torch_dense_bf16']:.2f}x | {vs8} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = args.out or RESULTS / ("activation_kernels.quick.json" if args.quick else "activation_kernels.json")
    write_json(out, result, indent=1)
    print(markdown(result))
    print(f"# saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
