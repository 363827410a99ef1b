"""benchmarks/bench_bitmap_bf16_walk.py: a tiny run writes every cell with finite rates, and the verdict rule."""

from __future__ import annotations

import json
import math

from benchmark_modules import load_benchmark


def test_tiny_run_writes_every_cell(tmp_path):
    bench = load_benchmark("bitmap_bf16_walk")
    out = tmp_path / "walk.json"
    assert bench.main(["--shapes", "40x96,33x70", "--kept", "0.25,0.5", "--ring-mb", "1", "--rounds", "2",
                       "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    expected = {(s, k, m, c) for s in ("40x96", "33x70") for k in (0.25, 0.5) for m in ("cold", "hot") for c in bench.WALKS}
    assert {(r["shape"], r["kept"], r["mode"], r["cell"]) for r in result["rows"]} == expected
    assert all(math.isfinite(r["gbps"]) and r["gbps"] > 0 and len(r["samples_us"]) == 2 for r in result["rows"])
    assert set(result["torch_fp32_gemv_gbps"]) == {"40x96", "33x70"}
    assert len(result["verdicts"]) == 4  # one per cold shape and density


def test_ring_copies_hold_the_same_weight_in_their_own_memory():
    bench = load_benchmark("bitmap_bf16_walk")
    ring = bench.bitmap_ring(24, 64, 0.25, 3)
    assert all(w.values.numel() == 24 * 16 for w in ring)  # a quarter of each row kept
    assert all(w.values.data_ptr() != ring[0].values.data_ptr() for w in ring[1:])
    assert all(w.values.equal(ring[0].values) and w.bitmap.equal(ring[0].bitmap) for w in ring[1:])


def test_verdict_compares_with_torch_fp32_streaming():
    bench = load_benchmark("bitmap_bf16_walk")
    row = dict(kept=0.25, mode="cold")
    rows = [{**row, "shape": "8x8", "cell": "bf16 walk", "gbps": 19.0, "us": 1.0},
            {**row, "shape": "8x8", "cell": "fma walk", "gbps": 9.5, "us": 2.0},
            {**row, "shape": "9x9", "cell": "bf16 walk", "gbps": 17.0, "us": 1.0},
            {**row, "shape": "9x9", "cell": "fma walk", "gbps": 17.0, "us": 1.0}]
    lines = bench.verdicts(rows, {"8x8": 20.0, "9x9": 20.0})
    assert [line.split(":")[0] for line in lines] == ["PASS", "FAIL"]
    assert "2.00x the FMA walk" in lines[0] and "0.85x torch" in lines[1]
