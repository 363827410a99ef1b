"""benchmarks/bench_lanes_tile.py: a tiny quick run writes every candidate's timing and a choice."""

from __future__ import annotations

import json

from benchmark_modules import load_benchmark


def test_quick_run_times_every_candidate_against_the_rule(tmp_path, capsys):
    bench = load_benchmark("lanes_tile")
    out = tmp_path / "t.json"
    assert bench.main(["--quick", "--rows", "128", "--cols", "256", "--budget", "0.01", "--threads", "1",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    labels = {"rule", "cols128", "cols256", "cols512", "cols1024", "rows32", "rows128"}
    assert [(r["format"], r["sparsity"]) for r in result["rows"]] == [("bitmap", 0.5), ("csr", 0.9)]
    for r in result["rows"]:
        assert set(r["ms"]) == labels and all(v > 0 for v in r["ms"].values())
        assert r["choice"] in labels and r["speedup_vs_rule"]["rule"] == 1.0
        assert r["shape"] == [128, 256] and r["batch"] == 64
    assert "| bitmap | 50% |" in capsys.readouterr().out
