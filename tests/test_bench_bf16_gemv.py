"""benchmarks/bench_bf16_gemv.py: a tiny run writes every cell with finite rates, and the verdict rule."""

from __future__ import annotations

import json
import math

from benchmark_modules import load_benchmark

from sparseforge.ops.dense_bf16 import dense_bf16_kernel


def test_tiny_run_writes_every_cell(tmp_path):
    bench = load_benchmark("bf16_gemv")
    out = tmp_path / "gemv.json"
    assert bench.main(["--shapes", "64x96,33x40", "--ring-mb", "1", "--rounds", "2", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    kernel = dense_bf16_kernel()
    cells = {f"ours {kernel}", "torch bf16", "torch fp32"} | ({"ours avx512 (widening)"} if kernel == "avx512_bf16" else set())
    assert {(r["shape"], r["cell"]) for r in result["rows"]} == {(s, c) for s in ("64x96", "33x40") for c in cells}
    assert all(math.isfinite(r["gbps"]) and r["gbps"] > 0 and len(r["samples_us"]) == 2 for r in result["rows"])
    assert len(result["verdicts"]) == 2


def test_verdict_compares_with_torch_fp32_streaming():
    bench = load_benchmark("bf16_gemv")
    rows = [{"shape": "8x8", "cell": "ours avx512_bf16", "gbps": 19.0, "us": 1.0},
            {"shape": "8x8", "cell": "torch fp32", "gbps": 20.0, "us": 1.0},
            {"shape": "8x8", "cell": "torch bf16", "gbps": 9.0, "us": 2.0},
            {"shape": "9x9", "cell": "ours avx2", "gbps": 17.0, "us": 1.0},
            {"shape": "9x9", "cell": "torch fp32", "gbps": 20.0, "us": 1.0},
            {"shape": "9x9", "cell": "torch bf16", "gbps": 9.0, "us": 3.0}]
    lines = bench.verdicts(rows)
    assert [line.split(":")[0] for line in lines] == ["PASS", "FAIL"]
    assert "2.00x faster than torch bf16" in lines[0] and "(0.85x)" in lines[1]
