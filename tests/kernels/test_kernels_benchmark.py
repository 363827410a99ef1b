"""benchmarks/kernels.py runs end to end on a tiny stack and writes its table and JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def test_kernel_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "k.json"
    argv = ["--layers", "2", "--hidden", "64", "--ffn", "96", "--batches", "1,5", "--budget", "0.01",
            "--bw-mib", "16", "--sparsities", "0.5,2:4,0.9", "--out", str(out)]
    assert mod.main(argv) == 0
    result = json.loads(out.read_text())
    kernels = {(r["kernel"], r["sparsity"], r["batch"]) for r in result["rows"]}
    assert ("nm", "2:4", 5) in kernels and ("bitmap_bf16", "90%", 1) in kernels and ("torch dense bf16", "0%", 1) in kernels
    assert ("nm", "50%", 1) not in kernels  # N:M only where the mask is 2:4
    for r in result["rows"]:
        assert r["ms"] > 0 and r["limit_ms"] > 0
        if "rel_err_layer0" in r:
            assert r["rel_err_layer0"] < (1e-2 if "bf16" in r["kernel"] else 1e-5)
    assert "| batch | kernel |" in out.with_suffix(".md").read_text()
    assert "peer comparisons skipped" in capsys.readouterr().out
    assert (torch.tensor([1e-40]) * 1.0).item() != 0.0  # flush-to-zero mode was not left on
