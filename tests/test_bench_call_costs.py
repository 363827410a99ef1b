"""benchmarks/bench_call_costs.py: a tiny run writes a finite cell per shape, thread count, mode and format."""

from __future__ import annotations

import json
import math

import pytest
from benchmark_modules import load_benchmark


def test_tiny_run_writes_every_cell_and_mode(tmp_path):
    bench = load_benchmark("call_costs")
    out = tmp_path / "costs.json"
    argv = ["--shapes", "64x256,96x128", "--threads", "1,2", "--calls", "2", "--evict-mib", "4", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    keys = {(r["shape"], r["threads"], r["mode"], r["cell"]) for r in result["rows"]}
    assert keys == {(s, t, m, c) for s in ("64x256", "96x128") for t in (1, 2) for m in bench.MODES for c in bench.CELLS}
    mb = {(r["shape"], r["cell"]): r["mb"] for r in result["rows"]}
    for r in result["rows"]:
        assert math.isfinite(r["ms"]) and 0 < r["min_ms"] <= r["ms"] and r["gbs"] > 0
    # the bytes are the formats' own: 50% float32 values are about half the dense weight, int8 values a quarter of that
    assert 0.45 < mb[("64x256", "bitmap 50%")] / mb[("64x256", "dense")] < 0.6
    assert mb[("64x256", "bitmap_i8 50%")] < 0.5 * mb[("64x256", "bitmap 50%")]
    assert len(result["loadavg_before"]) == 3 and result["host"]


def test_unknown_cells_are_rejected():
    bench = load_benchmark("call_costs")
    with pytest.raises(SystemExit, match="unknown cells"):
        bench.parse_args(["--cells", "dense,bitmap 75%"])
