"""benchmarks/bench_first_call.py: a quick run times compress_ and two native_generate calls that agree."""

from __future__ import annotations

import json

from benchmark_modules import load_benchmark


def test_quick_run_times_compress_and_both_calls_with_the_same_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path / "cache"))  # restored after the run, which sets its own
    bench = load_benchmark("first_call")
    out = tmp_path / "first_call.json"
    result = bench.main(["--quick", "--variants", "2:4", "0.5", "--threads", "1", "--out", str(out)])
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["2:4", "0.5"]
    for r in rows:
        assert r["same_tokens_both_calls"] and len(r["tokens"]) == 4
        assert r["compress_s"] > 0 and r["first_s"] >= r["first_prefill_s"] > 0 and r["second_s"] > 0
    assert rows[0]["formats"] == ["nm 2:4"]
    assert json.loads(out.read_text())["rows"] == rows
