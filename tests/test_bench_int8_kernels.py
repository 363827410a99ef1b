"""benchmarks/bench_int8_kernels.py: a tiny run writes finite cells for every format and mode, and the verdicts."""

from __future__ import annotations

import json
import math
import os

import pytest
from benchmark_modules import load_benchmark


def test_tiny_run_writes_every_cell(tmp_path):
    bench = load_benchmark("int8_kernels")
    out = tmp_path / "int8.json"
    argv = ["--shapes", "64x256,96x64", "--threads", "1", "--batches", "1,2", "--calls", "2", "--evict-mib", "4",
            "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    cells = {(r["shape"], r["batch"], r["cell"]) for r in result["rows"]}
    names = {"dense fp32", "bitmap_i8 50%", "bitmap_i8 75%", "nm_i8 2:4", "csr_i8 90%", "bitmap_i8 50% walk=fma",
             "bitmap_i8 75% walk=fma", "bitmap_i8 50% act=int8", "bitmap_i8 75% act=int8", "nm_i8 2:4 act=int8",
             "nm_i8 4:16 act=int8"}
    assert cells == {(s, b, c) for s in ("64x256", "96x64") for b in (1, 2) for c in names}
    for r in result["rows"]:
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["mb"] > 0 and r["cpu_ms"] >= 0
        assert math.isfinite(r["pct_bound"]) and r["pct_bound"] > 0
    assert isinstance(result["int8_vnni"], bool) and len(result["loadavg_before"]) == 3
    assert result["float_walk"] in ("fixed_x", "fma")


def test_compare_adds_the_reference_cells(tmp_path):
    bench = load_benchmark("int8_kernels")
    out = tmp_path / "int8.json"
    argv = ["--shapes", "64x256", "--threads", "1", "--calls", "2", "--evict-mib", "4", "--compare", "--out", str(out)]
    assert bench.main(argv) == 0
    cells = {r["cell"] for r in json.loads(out.read_text())["rows"]}
    assert {"bitmap_i8 50% walk=fma rows=2", "nm_i8 2:4 walk=fma rows=2", "bitmap_i8 50% act=int8 isa=avx2",
            "nm_i8 2:4 act=int8 isa=avx2"} <= cells
    assert "SPARSEFORGE_INT8_ROWS" not in os.environ and "SPARSEFORGE_INT8_WALK" not in os.environ  # restored


def test_cells_pick_the_timed_cells_and_reject_malformed_ones(tmp_path):
    bench = load_benchmark("int8_kernels")
    out = tmp_path / "int8.json"
    argv = ["--shapes", "64x256", "--threads", "1", "--calls", "2", "--evict-mib", "4", "--out", str(out),
            "--cells", "bitmap_i8 90%,bitmap_i8 90% walk=fma"]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["cell"] for r in rows} == {"dense fp32", "bitmap_i8 90%", "bitmap_i8 90% walk=fma"}
    mb = {r["cell"]: r["mb"] for r in rows}
    assert mb["bitmap_i8 90%"] < 0.3 * mb["dense fp32"]  # the sparsity in the cell's name is the weight's
    for bad in ("nm_i8 4:2", "nm_i8 75%", "nm_i8 two:four", "bitmap_i8 2:4"):
        with pytest.raises(SystemExit, match=bad):
            bench.parse_args(["--cells", bad])
    argv[-1] = "nm_i8 2:4,nm_i8 4:16"  # any N:M: the weight has the cell's pattern
    assert bench.main(argv) == 0
    mb = {r["cell"]: r["mb"] for r in json.loads(out.read_text())["rows"]}
    assert 0.55 * mb["nm_i8 2:4"] < mb["nm_i8 4:16"] < 0.65 * mb["nm_i8 2:4"]  # 0.375 vs 0.625 bytes per weight


def test_verdicts_follow_the_target():
    bench = load_benchmark("int8_kernels")
    row = dict(shape="4096x11008", threads=1, batch=1, pct_bound=50.0)
    rows = [dict(row, cell="dense fp32", pct_bound_cpu=100.0), dict(row, cell="nm_i8 2:4", pct_bound_cpu=95.0),
            dict(row, cell="bitmap_i8 50%", pct_bound_cpu=60.0), dict(row, cell="nm_i8 2:4", batch=2, pct_bound_cpu=10.0),
            dict(row, cell="bitmap_i8 50% walk=fma", pct_bound_cpu=95.0),  # a reference cell: no verdict
            dict(row, cell="csr_i8 90%", threads=2, pct_bound=92.0, pct_bound_cpu=40.0),  # two threads: by wall time
            dict(row, cell="nm_i8 2:4", threads=2, pct_bound=50.0, pct_bound_cpu=99.0)]
    lines = bench.targets({"rows": rows})
    assert [line.split(":")[0] for line in lines] == ["PASS", "FAIL", "PASS", "FAIL"]
    assert "by wall median" in lines[2] and "by CPU time" in lines[0]


def test_stack_times_every_walk_per_token(tmp_path):
    bench = load_benchmark("int8_kernels")
    out = tmp_path / "stack.json"
    assert bench.main(["--stack", "1", "--threads", "1", "--calls", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["walk"] for r in result["rows"]] == ["auto", "fma"]
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in result["rows"])
    # one layer of the four projections at 75%: values + bitmap + row offsets + scales
    dense = sum(o * i for o, i in bench.STACK_SHAPES)
    assert 0.3 * dense < result["mb"] * 1e6 < 0.45 * dense
    assert "SPARSEFORGE_INT8_WALK" not in os.environ
