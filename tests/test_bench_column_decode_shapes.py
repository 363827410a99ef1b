"""benchmarks/bench_column_decode_shapes.py: a quick run times every shape group at each thread count,
with the bytes its active channels read computed from the weights and the outputs equal to dense torch."""

from __future__ import annotations

import json

import torch

from benchmark_modules import load_benchmark


def test_quick_run_covers_every_group_and_thread_count(tmp_path):
    bench = load_benchmark("column_decode_shapes")
    out = tmp_path / "shapes.json"
    result = bench.main(["--quick", "--threads", "1,2", "--out", str(out)])
    groups = {r["group"] for r in result["rows"]}
    assert groups == {"q/o 256->256", "k/v 256->64", "gate/up 256->704", "down 704->256", "model order",
                      "stack 4096->11008"}
    assert sorted({r["threads"] for r in result["rows"]}) == [1, 2]
    for r in result["rows"]:
        assert r["us_per_call"] > 0 and r["fixed_us_per_call"] > 0 and r["gb_per_s"] > 0
        assert abs(r["ms_per_pass"] * 1e3 / r["calls"] - r["us_per_call"]) < 1e-6 * r["us_per_call"] + 1e-9
    assert json.loads(out.read_text())["rows"] == result["rows"]


def test_make_call_counts_the_active_channels_bytes_and_computes_the_layer():
    bench = load_benchmark("column_decode_shapes")
    call = bench.make_call(96, 130, torch.Generator().manual_seed(3))
    dense = call["weight"].to_dense()  # (130, 96)
    x, thr = torch.from_numpy(call["x"]), torch.from_numpy(call["thr"])
    active = (x.abs() > thr).reshape(-1)  # (96,)
    words = (130 + 63) // 64
    expected = int((dense[:, active] != 0).sum()) * 4 + int(active.sum()) * words * 8
    assert call["bytes"] == expected
    assert bench.time_group([call], 2, skip_all=False) > 0
    ref = (x * active) @ dense.T  # (1, 130)
    torch.testing.assert_close(torch.from_numpy(call["y"]), ref, rtol=1e-5, atol=1e-5)
