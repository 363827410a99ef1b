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
                      "stack 4096->11008", "model order, siblings grouped"}
    by = {(r["group"], r["threads"]): r for r in result["rows"]}
    for th in (1, 2):  # the same calls and bytes, as 8 native calls (2 layers x qkv, o, gate/up, down) instead of 14
        grouped, separate = by["model order, siblings grouped", th], by["model order", th]
        assert (grouped["calls"], separate["calls"]) == (8, 14)
        assert abs(grouped["mb_per_call"] * 8 - separate["mb_per_call"] * 14) < 1e-9
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


def test_grouped_siblings_compute_each_member_with_its_own_threshold():
    bench = load_benchmark("column_decode_shapes")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 96, generator=gen)
    calls = [bench.make_call(96, n, gen, x) for n in (64, 16, 16)]
    calls[1]["thr_t"].mul_(2.0)  # k's threshold apart from q's (the arrays share the tensor's memory)
    group = bench.make_group(calls, skip_all=False)
    assert group["bytes"] == sum(c["bytes"] for c in calls) and bench.time_group([group], 2, skip_all=False) > 0
    for c in calls:
        bench.time_group([c], 1, skip_all=False)  # each call alone writes its own y
    assert torch.equal(torch.from_numpy(group["y"]), torch.cat([torch.from_numpy(c["y"]) for c in calls], dim=1))
    skipped = bench.make_group(calls, skip_all=True)
    bench.time_group([skipped], 1, skip_all=True)
    assert torch.equal(torch.from_numpy(skipped["y"]), torch.zeros(1, 96))  # every channel skipped, no bias
