"""benchmarks/bench_int8_activation_error.py: a tiny run on a 2:4 + int8 checkpoint of the built-in model, and
its error sums."""

from __future__ import annotations

import json
import math

import torch

import sparseforge as sf
from benchmark_modules import load_benchmark
from sparseforge.generation import load_causal_lm
from sparseforge.quant import QuantConfig


def test_layer_error_sums():
    bench = load_benchmark("int8_activation_error")
    err = bench.LayerError((3, 4))
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])  # max/rms 1 and 2
    y = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])  # norms 5 and 1
    err.add(x, y, y + torch.tensor([[0.0, 0.0, 0.5], [0.2, 0.0, 0.0]]))
    row = err.row("l")
    assert math.isclose(row["rel_l2"], math.sqrt((0.25 + 0.04) / 26), rel_tol=1e-6)
    assert math.isclose(row["worst_token_rel_l2"], 0.2, rel_tol=1e-6)
    assert math.isclose(row["mean_outlier_ratio"], 1.5, rel_tol=1e-6) and row["tokens"] == 2


def test_tiny_run_measures_every_int8_layer(tmp_path):
    model, tokenizer, _ = load_causal_lm("builtin")
    report = sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", pattern="2:4", quantize=QuantConfig(bits=8)),
                          progress=False)
    path = sf.save_pretrained(model, tmp_path / "m", tokenizer=tokenizer)
    out = tmp_path / "err.json"
    assert load_benchmark("int8_activation_error").main([str(path), "--windows", "2", "--seqlen", "32",
                                                          "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["layers"]) == len(report.layers) > 0
    for r in result["layers"]:
        assert 0 < r["rel_l2"] < 0.2 and r["worst_token_rel_l2"] >= r["rel_l2"] * (1 - 1e-9) and r["tokens"] == 64
    assert math.isfinite(result["ppl_float"]) and result["ppl_int8"] != result["ppl_float"]
