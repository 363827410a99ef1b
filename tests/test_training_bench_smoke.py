"""benchmarks/bench_training.py on a tiny stack: every variant is timed, ratios are the same-round medians."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"


def test_training_benchmark_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("training_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "t.json"
    assert mod.main(["--layers", "2", "--hidden", "64", "--ffn", "96", "--batch", "8", "--rounds", "2",
                     "--sparsities", "0.5", "0.9", "--threads", "1", "--no-sparselab", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {(r["sparsity"], r["variant"]) for r in result["rows"]} == {
        (s, v) for s in (0.5, 0.9) for v in ("torch dense fp32", "sparseforge csr", "sparseforge bitmap")}
    for r in result["rows"]:
        assert r["median_ms"] == pytest.approx(statistics.median(r["runs_ms"]))
        base = next(d for d in result["rows"] if d["variant"] == "torch dense fp32" and d["sparsity"] == r["sparsity"])
        assert r["speedup_vs_dense"] == pytest.approx(base["median_ms"] / r["median_ms"])
    assert any("sparselab" in t and "peer-speed" in t for t in result["targets"])
    assert out.with_suffix(".md").read_text().startswith("Training step, 2 layers 96x64")
