"""benchmarks/bench_kv_speed.py: a tiny run writes consistent JSON, and the bytes bound is the
arithmetic the docs state."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kv_speed.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_kv_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kv_bytes_bound():
    b = _load()
    row = b.HKV * b.D * 2  # bf16 bytes of one token's K over the KV heads
    assert b.kv_bytes(32768, 2) == 2 * 32768 * row
    assert b.kv_bytes(32768, 2, budget=2048) == 2 * 2048 * row + 2 * 2048 * row  # pages' min and max
    assert b.kv_bytes(32768, 2) / b.kv_bytes(32768, 2, budget=2048) == 8.0  # the ~8x of the notes
    # float32 KV: the pages' min and max stay bfloat16 (the cache rounds them outward)
    assert b.kv_bytes(32768, 4, budget=2048) == 2 * 2048 * 2 * row + 2 * 2048 * row
    assert b.kv_bytes(500, 4, window=1024) == 2 * 500 * b.HKV * b.D * 4
    # Mustafar 70%, D 64: 21 kept values + one bitmap word per token, K and V; 768 of 1024 tokens compressed
    m = b.Mustafar(0.7, recent=256)
    assert b.kv_bytes(1024, 4, mustafar=m) == b.HKV * 768 * 2 * (21 * 4 + 8) + 2 * 256 * b.HKV * b.D * 4
    # Double Sparsity 1/16, 16 label channels: the budget's K and V plus 8 code bytes and a float32 scale per token
    assert b.kv_bytes(1024, 2, budget=64, label_channels=16) == 2 * 64 * b.HKV * b.D * 2 + b.HKV * 1024 * (8 + 4)


def test_mustafar_released_memory_is_the_compressed_format_plus_the_recent_window():
    import torch

    b = _load()
    m = b.Mustafar(0.7, recent=256)
    for dtype, elt in ((torch.float32, 4), (torch.bfloat16, 2)):
        # measured on a cache after the release: exactly the bytes the format needs (the bound's read bytes)
        assert b.mustafar_released_of_dense(1024, dtype) == b.kv_bytes(1024, elt, mustafar=m) / b.kv_bytes(1024, elt)


def test_tiny_run_writes_json(tmp_path, capsys):
    b = _load()
    out = tmp_path / "kv.json"
    assert b.main(["--contexts", "512", "--dtypes", "float32", "--seconds", "0.001", "--bandwidth-mb", "8",
                   "--threads", "1", "--layers", "2", "--prefill", "300", "--prefill-heads", "2", "1",
                   "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["context"] == 512 and set(row["ms"]) >= {"sdpa", "dense", "quest", "quest_kernel", "streaming", "mustafar",
                                                         "double_sparsity"}
    assert row["read_fraction"]["dense"] == 1.0 and 0 < row["read_fraction"]["double_sparsity"] < 0.2
    assert row["read_fraction"]["double_sparsity"] == row["bytes"]["double_sparsity"] / row["bytes"]["dense"]
    assert all(v > 0 for v in row["ms"].values())
    # speedups are medians of per-round paired ratios (the library timer): between the extremes of the per-round ratios
    assert 0 < row["dense_vs_sdpa"] and row["rounds"] >= 5
    (pre,) = data["prefill_rows"]
    assert pre["context"] == 300 and pre["heads"] == [2, 1] and set(pre["ms"]) == {"sdpa", "dense", "triangle"}
    assert all(v > 0 for v in pre["ms"].values()) and pre["triangle_vs_dense"] > 0 and pre["rounds"] >= 3
    assert data["meta"]["cpu"] and data["meta"]["bandwidth_gbs"] > 0
    printed = capsys.readouterr().out
    assert "| float32 | 512 |" in printed and "| float32 | float32 | 300 | 2/1 |" in printed and "dense prefill >= 1.0x SDPA" in printed


def test_paired_ratio_comes_from_the_library_timer(monkeypatch):
    """bench_context's speedups are Measurement.ratio of the fastest variants, as the advisor computes them."""
    b = _load()
    seen = []
    real = b.time_interleaved

    def spy(fns, **kw):
        m = real(fns, **kw)
        seen.append(m)
        return m
    monkeypatch.setattr(b, "time_interleaved", spy)
    row = b.bench_prefill(200, b.DTYPES["float32"], 0.001, 1, heads=(2, 1))
    (m,) = seen
    assert row["triangle_vs_dense"] == m.ratio("dense", "triangle")[0]
    assert row["dense_vs_sdpa"] == m.ratio("sdpa", "dense")[0]


def test_bf16_prefill_rows_name_their_compute_path(monkeypatch):
    """A bfloat16 row times our kernel in the bf16 compute path in force and says which."""
    from sparseforge.ops.prefill_attention import bf16_compute_path

    b = _load()
    row = b.bench_prefill(200, b.DTYPES["bfloat16"], 0.001, 1, heads=(2, 1))
    assert row["dtype"] == "bfloat16" and row["compute"] == {"scalar": "float32"}.get(bf16_compute_path(), bf16_compute_path())
    monkeypatch.setenv("SPARSEFORGE_BF16_PATH", "scalar")
    assert b.bench_prefill(200, b.DTYPES["bfloat16"], 0.001, 1, heads=(2, 1))["compute"] == "float32"
    assert "| bfloat16 | float32 | 200 | 2/1 |" in b.prefill_table([b.bench_prefill(200, b.DTYPES["bfloat16"], 0.001, 1, heads=(2, 1))])


def test_e2e_decode_steps_small_model():
    b = _load()
    e = b.bench_e2e(512, 1, bandwidth=10.0, hidden_size=64, intermediate_size=64, num_hidden_layers=2, vocab_size=128)
    assert set(e["tokens_per_s"]) == {"dense", "quest", "streaming", "mustafar"} and all(v > 0 for v in e["tokens_per_s"].values())
    # bound: bandwidth / (weights + layers * KV bytes per layer)
    assert abs(e["bound_tokens_per_s"]["dense"] - 10e9 / (e["weights_bytes"] + 2 * b.kv_bytes(512, 2))) < 1e-6
    assert e["quest_vs_dense_bound"] > 1.0
    assert set(e["by_linear"]) == {"native", "torch"} and e["by_linear"]["native"] == e["tokens_per_s"]
    text = b.e2e_table(e)
    assert "tokens/s (native bf16 GEMV) | tokens/s (torch F.linear)" in text and "| Quest vs dense |" in text


def test_native_linears_swap_and_restore():
    """NativeGemvLinear: one token through the native bf16 GEMV (F.linear up to float32 summation
    order before the bf16 rounding), several tokens through the layer itself; restore undoes the swap."""
    import torch

    b = _load()
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 40, bias=True), torch.nn.Linear(40, 8, bias=False)).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x1, x3 = torch.randn(1, 1, 96, generator=g).bfloat16(), torch.randn(1, 3, 96, generator=g).bfloat16()
    first = model[0]
    want1, want3 = model(x1), model(x3)
    swaps = b.native_linears_(model)
    assert len(swaps) == 2 and isinstance(model[0], b.NativeGemvLinear) and model[0].linear is first
    got1 = model(x1)
    assert got1.shape == want1.shape and got1.dtype == torch.bfloat16
    torch.testing.assert_close(got1.float(), want1.float(), rtol=0.02, atol=0.5)
    assert torch.equal(model(x3), want3)  # several tokens: the layers themselves
    b.restore_linears_(swaps)
    assert model[0] is first and torch.equal(model(x1), want1)


def test_decode_rows_time_torch_sdpa_in_a_group_of_its_own(monkeypatch):
    """torch's SDPA variants are timed apart from ours (its spinning OpenMP worker would slow whichever
    variant came next); dense vs SDPA is the ratio of the two groups' medians, the rest paired ratios."""
    import torch

    b = _load()
    seen = []
    real = b.time_interleaved

    def spy(fns, **kw):
        seen.append((set(fns), real(fns, **kw)))
        return seen[-1][1]
    monkeypatch.setattr(b, "time_interleaved", spy)
    row = b.bench_context(512, torch.float32, 0.001, 10.0, 1, layers=2)
    (sdpa_names, sdpa), (ours_names, ours) = seen
    assert sdpa_names == {"sdpa_gqa", "sdpa_packed", "sdpa_packed_1thread"}
    assert not ours_names & sdpa_names and {"dense_pool", "mustafar", "quest_pool"} <= ours_names
    assert row["dense_vs_sdpa"] == row["ms"]["sdpa"] / row["ms"]["dense"]
    assert row["ms"]["sdpa"] == min(sdpa.ms().values())
    assert row["mustafar_vs_dense"] == ours.ratio(min(("dense_pool", "dense_serial"), key=ours.ms().get), "mustafar")[0]
