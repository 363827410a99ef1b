"""benchmarks/bench_generate.py: a quick run gives one row per path, the same tokens on every path, and its JSON."""

from __future__ import annotations

import json
import math

import pytest

from benchmark_modules import load_benchmark


def test_quick_run_compares_the_paths_on_the_same_tokens(tmp_path):
    bench = load_benchmark("generate")
    out = tmp_path / "generate.json"
    result = bench.main(["--quick", "--models", "llama", "--variants", "dense", "2:4", "--threads", "1", "--new", "4",
                         "--out", str(out)])
    rows = result["rows"]
    paths = ["generate", "lean", "engine", "engine+sdpa"]
    assert [(r["variant"].split()[0], r["path"]) for r in rows] == [("dense", p) for p in paths] + [("2:4", p) for p in paths]
    assert all(r["same_tokens_as_generate"] for r in rows)
    for r in rows:
        assert r["ms_per_token"] > 0 and math.isfinite(r["gbps"]) and r["weight_bytes_per_token"] > 0
        assert r["gbps"] == pytest.approx(r["weight_bytes_per_token"] / r["ms_per_token"] / 1e6)
    dense, sparse = rows[0], rows[4]
    assert sparse["weight_bytes_per_token"] < dense["weight_bytes_per_token"]  # 2:4 values + indices < dense fp32
    assert dense["overhead_ms"] == pytest.approx(dense["ms_per_token"] - dense["weight_ms_at_gemv_rate"])
    assert sparse["overhead_ms"] is None  # the dense GEMV rate is no bound for a sparse kernel
    for r in rows:
        assert r["linears_ms"] > 0 and r["beyond_linears_ms"] == pytest.approx(r["ms_per_token"] - r["linears_ms"])
    assert [r["speedup_vs_generate"] for r in rows if r["path"] == "generate"] == [1.0, 1.0]
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))


def test_new_tokens_below_two_are_refused():
    bench = load_benchmark("generate")
    with pytest.raises(SystemExit):
        bench.parse_args(["--new", "1"])
