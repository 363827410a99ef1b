"""benchmarks/bench_bf16_kernels.py: a tiny run writes finite cells for every format, and the verdicts."""

from __future__ import annotations

import json
import math

from benchmark_modules import load_benchmark

from sparseforge import kernels


def test_tiny_run_writes_every_cell(tmp_path):
    bench = load_benchmark("bf16_kernels")
    out = tmp_path / "bf16.json"
    argv = ["--layers", "2", "--hidden", "64", "--ffn", "96", "--batch", "16", "--threads", "1", "--budget", "0.01",
            "--sparsities", "0.5,2:4,0.9", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    cells = {(r["sparsity"], r["format"], r["compute"]) for r in result["rows"]}
    assert cells == {("50%", "bitmap", "bf16"), ("50%", "bitmap", "fp32"), ("2:4", "nm", "bf16"), ("2:4", "nm", "fp32"),
                     ("2:4", "bitmap", "bf16"), ("2:4", "bitmap", "fp32"), ("90%", "bitmap", "bf16"),
                     ("90%", "bitmap", "fp32"), ("90%", "csr", "bf16"), ("90%", "csr", "fp32")}  # fmt: skip
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 and r["weight_mb"] > 0 for r in result["rows"])
    assert {r["path"] for r in result["rows"] if r["compute"] == "bf16"} == {kernels.bf16_path()}
    assert set(result["dense_ms"]) == {"torch dense fp32", "torch dense bf16"}
    # the bf16 cells ran the method measured for their layers (bf16 values: panel and skip both apply)
    assert all(set(r["method"].split("/")) <= {"panel", "skip"} for r in result["rows"] if r["compute"] == "bf16")


def test_methods_flag_times_each_bf16_method(tmp_path):
    bench = load_benchmark("bf16_kernels")
    out = tmp_path / "bf16.json"
    argv = ["--layers", "2", "--hidden", "64", "--ffn", "96", "--batch", "16", "--threads", "1", "--budget", "0.01",
            "--sparsities", "0.9", "--methods", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["format"], r["method"]) for r in rows if r["compute"] == "bf16" and r["method"] in ("panel", "skip")} == {
        ("bitmap", "panel"), ("bitmap", "skip"), ("csr", "panel"), ("csr", "skip")}


def test_verdicts_follow_the_targets():
    bench = load_benchmark("bf16_kernels")
    rows = [{"sparsity": "50%", "compute": "bf16", "vs_bf16_dense": 1.2}, {"sparsity": "2:4", "compute": "bf16", "vs_bf16_dense": 0.9},
            {"sparsity": "90%", "compute": "bf16", "vs_bf16_dense": 1.9}, {"sparsity": "90%", "compute": "fp32", "vs_bf16_dense": 3.0}]  # fmt: skip
    lines = bench.targets({"rows": rows})
    assert [line.split(":")[0] for line in lines] == ["PASS", "FAIL", "FAIL"]
