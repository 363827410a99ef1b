"""benchmarks/bench_quant_quality.py: its verdicts, and a quick run on the built-in model."""

from __future__ import annotations

import json
import math

import pytest

from benchmark_modules import load_benchmark

import transformers  # noqa: F401  (test dependency: missing means failure)


def row(model, metric, variant, change, pattern="2:4"):
    return {"model": model, "metric": metric, "pattern": pattern, "variant": variant, "value": 1.0, "vs_fp32": change}


def test_verdicts_hold_the_issue_targets():
    bench = load_benchmark("quant_quality")
    rows = [row("builtin", "perplexity", "joint int8", 0.004), row("lm2", "perplexity", "joint int8", 0.02),
            row("minilm", "embedding cosine", "joint int8", -0.004), row("enc2", "embedding cosine", "joint int8", -0.01),
            row("builtin", "perplexity", "joint int8", 0.5, pattern="50%"),  # the target names 2:4 only
            row("builtin", "perplexity", "rtn int8", 0.5)]
    verdicts = bench.verdicts(rows)
    assert [v.rsplit(" ", 1)[1] for v in verdicts] == ["met", "MISSED", "met", "MISSED"]
    assert "| builtin | 2:4 | joint int8 | perplexity | 1.0000 | +0.40% |" in bench.table(rows)


@pytest.mark.slow
def test_quick_run_on_the_builtin_model(tmp_path):
    bench = load_benchmark("quant_quality")
    assert bench.main(["--quick", "--models", "builtin", "--patterns", "2:4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quant_quality.quick.json").read_text())
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "rtn int8", "joint int8", "rtn int4", "joint int4"]
    assert all(math.isfinite(r["value"]) and r["value"] > 1 for r in rows)
    assert rows[0]["vs_fp32"] == 0.0
    assert rows[3]["value"] != rows[0]["value"]  # int4 rounding does change the model
    assert len(result["verdicts"]) == 1 and "joint int8 + 2:4" in result["verdicts"][0]
