"""The column-sparse GEMV per projection shape of the decode model, called cold as a decode step calls it.

``bench_activation_decode.py`` runs a Llama-shaped model (hidden 2048, 16 layers, FFN 5632, GQA with
512 key/value outputs) whose 112 column-sparse calls per token stream their weights more slowly than
the 4096 / 11008 kernel stack of ``bench_activation_kernels.py``. This script separates the shapes:
each projection of each layer gets its own weight (50% pruned at random, column bitmap format,
float32 values) and input (50% TEAL: the threshold is the median ``|x|``), and the calls of one
group cycle through all layers' distinct weights, so every call reads its weight from memory as in
a decode step (q/o 2048->2048, k/v 2048->512, gate/up 2048->5632, down 5632->2048, all 112 in model
order, and a stack of 4 4096->11008 layers as the reference), at 1 and 2 threads. For each group:
microseconds per call, the bytes its active channels read (kept values plus the bitmap rows) over
that time, and the fixed cost per call (threshold +inf: every channel skipped, so binding, threshold
test, compaction and output init without any streaming). q / k / v of a layer share one input, and gate
/ up another, as in a decoder layer; ``model order, siblings grouped`` runs the same 112 calls as 64,
q / k / v and gate / up each as one native call (``sparseforge.ops.column_sparse.bind_group``, what
:class:`~sparseforge.activation.column_group.ColumnSparseSiblings` runs in the decode engine), each
member with its own threshold; its ``calls`` counts the native calls. The two model-order rows are
timed in alternation, pass by pass.

Usage:
    python benchmarks/bench_column_decode_shapes.py              # the decode model's shapes (~1.8 GB)
    python benchmarks/bench_column_decode_shapes.py --quick      # hidden 256, 2 layers (smoke)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_host import host_info, host_line

from sparseforge.formats.colbitmap import ColumnBitmapWeight
from sparseforge.kernels import num_threads, set_num_threads
from sparseforge.ops.column_sparse import bind_group, kernel_args

GROUPED = "model order, siblings grouped"  # q / k / v and gate / up as one call each: 64 calls per token
GROUPS = {"q/o": ("q", "o"), "k/v": ("k", "v"), "gate/up": ("gate", "up"), "down": ("down",),
          "model order": ("q", "k", "v", "o", "gate", "up", "down")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--kv", type=int, default=512, help="key / value outputs (GQA)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--stack", type=int, default=4, help="4096->11008 reference layers (0: none)")
    p.add_argument("--rounds", type=int, default=9, help="passes over each group; the median of all but the first")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--quick", action="store_true", help="hidden 256, FFN 704, kv 64, 2 layers, 1 stack layer, 3 rounds")
    p.add_argument("--start-file", type=Path, default=None,
                   help="after building every weight, wait until this file exists before timing (start the timing "
                        "from a quiet moment)")
    p.add_argument("--out", default="benchmarks/results/column_decode_shapes.json")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.ffn, a.kv, a.layers, a.stack, a.rounds = 256, 704, 64, 2, 1, 3
    a.threads = [int(t) for t in a.threads.split(",")]
    return a


def make_call(fin: int, fout: int, gen: torch.Generator, x: "torch.Tensor | None" = None) -> dict:
    """One layer's weight (50% pruned, column bitmap) and input (``x``, else a new one) at 50% TEAL, bound for
    repeated calls."""
    w = torch.randn(fout, fin, generator=gen)
    w = w * (torch.rand(w.shape, generator=gen) >= 0.5)  # (out, in), half pruned
    c = ColumnBitmapWeight.from_dense(w)
    x = torch.randn(1, fin, generator=gen) if x is None else x  # (1, in)
    thr = torch.tensor([float(x.abs().median())])
    active = (x.abs() > thr).reshape(-1)
    starts = c.block_ptr[:: (c.block_ptr.numel() - 1) // fin]  # (in + 1,) each channel's first value
    per_channel = starts[1:] - starts[:-1]  # (in,) kept values per channel
    row_bytes = c.bitmap.numel() * c.bitmap.element_size() // fin  # bitmap bytes per channel
    nbytes = int(per_channel[active].sum()) * 4 + int(active.sum()) * row_bytes
    return {"args": kernel_args(c.bitmap, c.block_ptr, c.values, fout), "x": x.numpy(), "thr": thr.numpy(),
            "y": torch.empty(1, fout).numpy(), "bytes": nbytes, "weight": c, "thr_t": thr}


def make_group(calls: list[dict], skip_all: bool) -> dict:
    """Sibling calls of one input (q / k / v, gate / up) bound as one native call (``bind_group``, as
    ``ColumnSparseSiblings`` runs them), each with its own threshold (+inf for ``skip_all``)."""
    inf = torch.tensor([float("inf")])
    specs = [(c["weight"].bitmap, c["weight"].block_ptr, c["weight"].values, inf if skip_all else c["thr_t"], None,
              c["weight"].shape[0], None) for c in calls]
    out = sum(c["weight"].shape[0] for c in calls)
    return {"group": bind_group(specs), "x": calls[0]["x"], "y": torch.empty(1, out).numpy(),
            "bytes": sum(c["bytes"] for c in calls)}


def time_group(calls: list[dict], rounds: int, skip_all: bool) -> float:
    """Median seconds of one pass over ``calls`` (the first pass dropped); a grouped call (``make_group``) has its
    thresholds bound: ``skip_all`` takes a list of the same groups bound with +inf."""
    inf = torch.tensor([float("inf")]).numpy()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for c in calls:
            if "group" in c:
                c["group"](c["x"], c["y"])
                continue
            kernel, *views = c["args"]
            kernel(c["x"], *views, inf if skip_all else c["thr"], None, c["y"])
        per.append(time.perf_counter() - t0)
    return statistics.median(per[1:] if len(per) > 1 else per)


def time_interleaved(call_lists: list[list[dict]], rounds: int) -> list[float]:
    """Median seconds of one pass over each list, the lists' passes taken in turn (the first round dropped)."""
    per = [[] for _ in call_lists]
    for _ in range(rounds):
        for i, calls in enumerate(call_lists):
            per[i].append(time_group(calls, 1, False))
    return [statistics.median(p[1:] if len(p) > 1 else p) for p in per]


def run(args) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, f, kv = args.hidden, args.ffn, args.kv
    shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, f), "up": (h, f), "down": (f, h)}
    model = []
    for _ in range(args.layers):  # q / k / v share one input, gate / up another (as in a decoder layer)
        x_attn, x_mlp = torch.randn(1, h, generator=gen), torch.randn(1, h, generator=gen)
        shared = {"q": x_attn, "k": x_attn, "v": x_attn, "gate": x_mlp, "up": x_mlp}
        model.append({n: make_call(*shape, gen, shared.get(n)) for n, shape in shapes.items()})
    groups = {f"{g} {shapes[names[0]][0]}->{shapes[names[0]][1]}" if len(names) < 7 else g:
              [layer[n] for layer in model for n in names] for g, names in GROUPS.items()}
    # the same 112 calls as 64: q / k / v and gate / up one native call each (ColumnSparseSiblings)
    sibling_sets = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
    grouped = {skip: [make_group([layer[n] for n in names], skip) if len(names) > 1 else layer[names[0]]
                      for layer in model for names in sibling_sets] for skip in (False, True)}
    if args.stack:
        groups["stack 4096->11008"] = [make_call(4096, 11008, gen) for _ in range(args.stack)]
    if args.start_file is not None:
        print(f"warmed up; waiting for {args.start_file}", flush=True)
        while not args.start_file.exists():
            time.sleep(0.5)
    before = num_threads()
    rows = []
    try:
        for th in args.threads:
            set_num_threads(th)
            # model order separate and grouped: timed in alternation (a drifting load hits both alike)
            pair = time_interleaved([groups["model order"], grouped[False]], args.rounds)
            for name, calls in [*groups.items(), (GROUPED, grouped[False])]:
                t = pair[0] if name == "model order" else pair[1] if name == GROUPED else time_group(calls, args.rounds, False)
                fixed = time_group(grouped[True] if name == GROUPED else calls, args.rounds, True)
                nbytes = sum(c["bytes"] for c in calls)
                rows.append({"group": name, "threads": th, "calls": len(calls), "us_per_call": t / len(calls) * 1e6,
                             "fixed_us_per_call": fixed / len(calls) * 1e6, "mb_per_call": nbytes / len(calls) / 1e6,
                             "gb_per_s": nbytes / t / 1e9, "ms_per_pass": t * 1e3})
                r = rows[-1]
                print(f"{name:30s} {th} thr  {r['us_per_call']:8.1f} us/call  {r['gb_per_s']:5.1f} GB/s  fixed "
                      f"{r['fixed_us_per_call']:5.1f} us/call  {r['mb_per_call']:6.2f} MB/call  "
                      f"{r['ms_per_pass']:7.2f} ms / {len(calls)} calls", flush=True)
    finally:
        set_num_threads(before)
    return {"meta": {"host": host_info(), "layers": args.layers, "hidden": h, "ffn": f, "kv": kv,
                     "rounds": args.rounds}, "rows": rows}


def main(argv=None) -> dict:
    args = parse_args(argv)
    print(f"# {host_line()}", flush=True)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    return result


if __name__ == "__main__":
    main()
