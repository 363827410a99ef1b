"""The activation-sparsity benchmark scripts run end to end on tiny shapes and write sane JSON."""

from __future__ import annotations

import json
import math

import pytest

from benchmark_modules import load_benchmark
from sparseforge import kernels


def test_kernel_benchmark_writes_bounds_and_baselines(tmp_path):
    bench = load_benchmark("activation_kernels")
    out = tmp_path / "k.json"
    bench.main(["--layers", "2", "--hidden", "64", "--ffn", "96", "--sparsities", "0,0.5", "--budget", "0.01",
                "--bw-mib", "4", "--prefill", "3", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    gemv = [r for r in result["rows"] if r["kernel"] == "sparse-input GEMV"]
    assert {(r["dtype"], r["sparsity"]) for r in gemv} == {(d, s) for d in ("fp32", "bf16") for s in (0.0, 0.5)}
    for r in gemv:
        dense = next(d["ms"] for d in result["rows"] if d["kernel"] == "torch dense" and d["dtype"] == r["dtype"])
        own = next(g["ms"] for g in gemv if g["dtype"] == r["dtype"] and g["sparsity"] == 0.0)
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert math.isclose(r["bound_ms"], (1 - r["sparsity"]) * min(dense, own))
        assert math.isclose(r["of_bound"], r["bound_ms"] / r["ms"]) and math.isclose(r["vs_torch_dense"], dense / r["ms"])
    assert any(r["batch"] == 3 and "native GEMM" in r["kernel"] for r in result["rows"])
    assert "| fp32 | 1 | sparse-input GEMV | 50% |" in bench.markdown(result)
    # weight 50% in the column format times activation sparsity: bound from the format's bytes
    col = [r for r in result["rows"] if r["kernel"] == "column GEMV (weight 50%)"]
    assert {(r["dtype"], r["sparsity"]) for r in col} == {(d, s) for d in ("fp32", "bf16") for s in (0.0, 0.25, 0.5, 0.65)}
    for r in col:
        dense = next(d["ms"] for d in result["rows"] if d["kernel"] == "torch dense" and d["dtype"] == r["dtype"])
        own = next(g["ms"] for g in gemv if g["dtype"] == r["dtype"] and g["sparsity"] == 0.0)
        assert 0.5 < r["bytes_ratio"] < 0.75  # kept values + bitmap + block pointers at 50% weight sparsity
        assert math.isclose(r["bound_ms"], (1 - r["sparsity"]) * r["bytes_ratio"] * min(dense, own))
        assert math.isclose(r["vs_torch_dense"], dense / r["ms"])
    assert {r["dtype"] for r in result["rows"] if r["batch"] == 3 and r["kernel"].startswith("column layout GEMM")} == {"fp32", "bf16"}
    walk = kernels.native().column_sparse_walk("")
    assert {r["walk"] for r in col} == {walk}
    plain = [r for r in result["rows"] if r["kernel"] == "column GEMV (weight 50%), avx512 walk"]
    # a VBMI2 CPU times the plain AVX-512 walk of bf16 values beside it, at the same bound
    assert {(r["dtype"], r["sparsity"]) for r in plain} == (
        {("bf16", s) for s in (0.0, 0.25, 0.5, 0.65)} if walk == "avx512_vbmi2" else set())
    for r in plain:
        twin = next(c for c in col if c["dtype"] == "bf16" and c["sparsity"] == r["sparsity"])
        assert r["bound_ms"] == twin["bound_ms"] and math.isclose(r["of_bound"], r["bound_ms"] / r["ms"])


def test_kernel_benchmark_prefill_rows_against_torch_fp32_and_bf16(tmp_path):
    bench = load_benchmark("activation_kernels")
    out = tmp_path / "k.json"
    bench.main(["--layers", "2", "--hidden", "64", "--ffn", "96", "--sparsities", "0", "--col-sparsities", "0",
                "--budget", "0.01", "--bw-mib", "4", "--prefill", "20", "--cpu-time", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["meta"]["clock"] == "thread cpu time" and result["meta"]["threads"] == 1
    rows = [r for r in result["rows"] if r["batch"] == 20]
    for dt in ("fp32", "bf16"):
        base = {k: next(r["ms"] for r in rows if r["dtype"] == dt and r["kernel"] == f"torch dense {k} (pruned weights)")
                for k in ("fp32", "bf16")}
        ours = [r for r in rows if r["dtype"] == dt and r["kernel"].startswith("column layout")]
        kinds = {r["kernel"].split(" (weight")[0] for r in ours}
        want = {"column layout GEMM fp32"} | ({f"column layout bf16 ({kernels.bf16_path()})"} if dt == "bf16" else set())
        assert kinds == want and {r["sparsity"] for r in ours} == {0.0, 0.5}
        for r in ours:
            assert 0.0 < r["union"] <= 1.0 and r["threads_used"] == 1
            assert math.isclose(r["vs_torch_dense_fp32"], base["fp32"] / r["ms"])
            assert math.isclose(r["vs_torch_dense_bf16"], base["bf16"] / r["ms"])
            assert r["vs_torch_dense"] == r[f"vs_torch_dense_{dt}"]
        assert next(r for r in ours if r["sparsity"] == 0.0)["union"] == 1.0  # threshold 0 on N(0, 1): every channel


def test_decode_benchmark_compares_dense_and_teal(tmp_path):
    bench = load_benchmark("activation_decode")
    out = tmp_path / "d.json"
    result = bench.main(["--hidden", "64", "--layers", "1", "--ffn", "96", "--vocab", "128", "--new", "2",
                         "--repeats", "1", "--threads", "1", "--values", "fp32,bf16", "--teal-values", "fp32,bf16",
                         "--out", str(out)])
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["dense fp32", "dense fp32 (torch 1 thread)", "dense bf16", "TEAL 50%", "TEAL 40%",
                          "weight 50% (column) + TEAL 50%", "weight 50% (column) + TEAL 40%",
                          "TEAL 50% (bf16 weights)", "TEAL 40% (bf16 weights)",
                          "weight 50% (column, bf16 values) + TEAL 50%", "weight 50% (column, bf16 values) + TEAL 40%"]
    layer, rest = result["layer_bytes"], result["rest_bytes"]
    teal50 = rows["TEAL 50%"]
    assert teal50["bytes_bound"] == (layer + rest) / (layer * 0.5 + rest) and teal50["tokens_per_s"] > 0
    base32 = min(rows["dense fp32"]["s_per_token"], rows["dense fp32 (torch 1 thread)"]["s_per_token"])
    base16 = rows["dense bf16"]["s_per_token"]
    for dt, tag in (("fp32", "column"), ("bf16", "column, bf16 values")):
        both = rows[f"weight 50% ({tag}) + TEAL 50%"]
        ratio = result["column_bytes_ratio"][f"column {dt}"]  # column bytes / dense bytes of the same dtype
        assert 0.5 < ratio < 0.75 and both["weight_sparsity"] == 0.5 and both["values"] == dt
        half = 0.5 if dt == "bf16" else 1.0  # a bf16 variant against the bf16 model (its lm_head stays fp32)
        assert math.isclose(both["bytes_bound"], half * (layer + rest) / (half * layer * 0.5 * ratio + rest))
        assert math.isclose(both["speedup"], base32 / both["s_per_token"])
        assert math.isclose(both["vs_dense_bf16"], base16 / both["s_per_token"])
        own = base16 if dt == "bf16" else base32
        assert math.isclose(both["of_bound"], own / both["s_per_token"] / both["bytes_bound"])
    assert rows["dense bf16"]["bytes_bound"] == 1.0 and rows["dense bf16"]["of_bound"] == 1.0
    assert rows["TEAL 50% (bf16 weights)"]["values"] == "bf16" and rows["TEAL 50% (bf16 weights)"]["tokens_per_s"] > 0
    assert json.loads(out.read_text())["rows"][0]["variant"] == "dense fp32"
    mixed = bench.main(["--hidden", "64", "--layers", "1", "--ffn", "96", "--vocab", "128", "--new", "2",
                         "--repeats", "1", "--threads", "1", "--values", "fp32,bf16", "--sparsities", "0.5",
                         "--out", str(tmp_path / "e.json")])
    assert [r["variant"] for r in mixed["rows"]] == ["dense fp32", "dense fp32 (torch 1 thread)", "dense bf16",
                                                      "TEAL 50%", "weight 50% (column) + TEAL 50%",
                                                      "weight 50% (column, bf16 values) + TEAL 50%"]
    lean = bench.main(["--hidden", "64", "--layers", "1", "--ffn", "96", "--vocab", "128", "--new", "2", "--repeats", "1",
                       "--threads", "1", "--sparsities", "0.5", "--values", "bf16", "--teal-values", "none",
                       "--out", str(tmp_path / "g.json")])
    assert [r["variant"] for r in lean["rows"]] == ["dense fp32", "dense fp32 (torch 1 thread)", "dense bf16",
                                                    "weight 50% (column, bf16 values) + TEAL 50%"]
    default = bench.main(["--hidden", "64", "--layers", "1", "--ffn", "96", "--vocab", "128", "--new", "2",
                          "--repeats", "1", "--threads", "1", "--sparsities", "0.5", "--out", str(tmp_path / "f.json")])
    assert [r["variant"] for r in default["rows"]] == [  # fp32 only, as the target reads
        "dense fp32", "dense fp32 (torch 1 thread)", "TEAL 50%", "weight 50% (column) + TEAL 50%"]
    assert all(r["vs_dense_bf16"] is None for r in default["rows"])
    ungrouped = bench.main(["--hidden", "64", "--layers", "1", "--ffn", "96", "--vocab", "128", "--new", "2",
                            "--repeats", "1", "--threads", "1", "--sparsities", "0.5", "--teal-values", "none",
                            "--ungrouped", "--out", str(tmp_path / "u.json")])
    assert [r["variant"] for r in ungrouped["rows"]] == [  # the column variant with its siblings called one by one
        "dense fp32", "dense fp32 (torch 1 thread)", "weight 50% (column) + TEAL 50%",
        "weight 50% (column) + TEAL 50%, siblings ungrouped"]
    assert ungrouped["rows"][3]["bytes_bound"] == ungrouped["rows"][2]["bytes_bound"]


@pytest.mark.slow
def test_relufy_benchmark_reports_lossless_sparse_variants(tmp_path):
    bench = load_benchmark("activation_relufy")
    out = tmp_path / "r.json"
    result = bench.main(["--steps", "2", "--windows", "1", "--new-tokens", "2", "--seqlen", "16", "--batch-size", "1",
                         "--prosparse-factors", "1.0", "--fatrelu", "0.05", "--out", str(out)])
    rows = result["rows"]
    assert [r["variant"] for r in rows][:2] == ["original (SiLU)", "relu2, no training"]
    assert [r["variant"] for r in rows][4:] == ["relu, ProSparse L1 stages 1", "relu, ProSparse L1 stages 1 + FATReLU 0.05"]
    assert len(rows) == 6 and rows[0]["sparsity"] == 0.0
    assert rows[5]["sparsity"] > rows[4]["sparsity"]  # the threshold shift zeroes more gate outputs
    assert result["meta"]["prosparse_schedule"] == [[0.0, 1], [1.0, 2]]
    for r in rows[1:]:
        assert 0.3 < r["sparsity"] < 1.0 and r["decode_sparse_tps"] > 0
        assert math.isclose(r["ppl_sparse"], r["ppl"], rel_tol=1e-4)  # skipping exact zeros is lossless
    assert all(v.startswith("PASS") for v in result["verdicts"])
    assert json.loads(out.read_text())["meta"]["steps"] == 2


def test_kernel_benchmark_int8_column_cells_against_torch_and_fp32_values(tmp_path):
    bench = load_benchmark("activation_kernels")
    out = tmp_path / "k.json"
    bench.main(["--sections", "int8", "--layers", "2", "--hidden", "64", "--ffn", "96", "--col-sparsities", "0,0.5",
                "--budget", "0.01", "--bw-mib", "4", "--prefill", "20", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert rows and all(r["section"] == "int8" for r in rows)  # the other sections did not run
    cells = [r for r in rows if r["kernel"].startswith("colbitmap ")]
    assert {(r["batch"], r["dtype"], r["sparsity"]) for r in cells} == {
        (b, v, s) for b in (1, 20) for v in ("fp32", "int8") for s in (0.0, 0.5)}
    for r in cells:
        base = {k: next(b["ms"] for b in rows if b["batch"] == r["batch"] and b["kernel"].startswith(f"torch dense {k}"))
                for k in ("fp32", "bf16")}
        assert math.isclose(r["vs_torch_dense_fp32"], base["fp32"] / r["ms"])
        assert math.isclose(r["vs_torch_dense_bf16"], base["bf16"] / r["ms"])
        if r["dtype"] == "int8":
            fp32 = next(c["ms"] for c in cells if c["dtype"] == "fp32" and c["batch"] == r["batch"]
                        and c["sparsity"] == r["sparsity"])
            assert math.isclose(r["vs_fp32_values"], fp32 / r["ms"])
            assert 0.15 < r["bytes_ratio"] < 0.35  # 1 byte per kept weight of 4 (50% kept) + bitmap, pointers, scales
        else:
            assert 0.5 < r["bytes_ratio"] < 0.75
        if r["batch"] == 1:
            assert math.isclose(r["bound_ms"], (1 - r["sparsity"]) * r["bytes_ratio"] * base["fp32"])
        else:
            assert "bound_ms" not in r
    text = bench.markdown(result)
    assert "int8 values in the column layout" in text and "| 1 | int8 | 50% |" in text


def test_decode_benchmark_breakdown_splits_each_sparse_step(tmp_path):
    """--breakdown: one row per sparse variant (none for the dense ones), whose parts add up to the step.
    The kernel share is a difference of two timed decodes (long - short), which on this tiny model can
    come out at +-0 in timing noise: only its being a number is checked here; that the timer sees the
    kernels is test_kernel_seconds_times_the_bound_kernels_and_restores_them."""
    bench = load_benchmark("activation_decode")
    result = bench.main(["--hidden", "64", "--layers", "1", "--ffn", "96", "--vocab", "128", "--new", "2",
                         "--repeats", "1", "--threads", "1", "--sparsities", "0.5", "--breakdown",
                         "--breakdown-tokens", "6", "--out", str(tmp_path / "b.json")])
    split = {r["variant"]: r for r in result["breakdown"]}
    assert list(split) == ["TEAL 50%", "weight 50% (column) + TEAL 50%"]
    for r in split.values():
        assert math.isfinite(r["sparse_kernels_ms"]) and r["lm_head_ms"] > 0 and r["step_ms"] > 0
        assert math.isclose(r["sparse_kernels_ms"] + r["lm_head_ms"] + r["rest_ms"], r["step_ms"])


def test_kernel_seconds_times_the_bound_kernels_and_restores_them(monkeypatch):
    import torch

    from sparseforge.activation import ColumnSparseLinear, SparseInputLinear
    from sparseforge.activation.column_group import ColumnSparseSiblings

    bench = load_benchmark("activation_decode")
    layer = SparseInputLinear(8, 4, threshold=0.1)
    calls = []

    class FakeModel:  # decode_seconds is replaced: only the binding of bound_gemv is exercised
        pass

    group = ColumnSparseSiblings([ColumnSparseLinear.from_linear(torch.nn.Linear(8, n), threshold=0.1) for n in (4, 2)])

    def fake_decode(model, prompt, new, engine, fuse=True):
        gemv, grouped = layer.bound_gemv(), group.bound_gemv()  # a group the engine would build: timed too
        for _ in range(new):
            calls.append(gemv(torch.randn(1, 8)))
            calls.append(grouped(torch.randn(1, 8)))
        return 0.5

    monkeypatch.setattr(bench, "decode_seconds", fake_decode)
    spent, per_token = bench.kernel_seconds(FakeModel(), {"l": layer}, None, 3, "native")
    assert len(calls) == 6 and spent > 0 and per_token == 0.5
    assert "bound_gemv" not in vars(layer)  # the class's method again
    assert ColumnSparseSiblings.bound_gemv.__qualname__ == "ColumnSparseSiblings.bound_gemv"
    x = torch.ones(1, 8)
    assert torch.equal(group.bound_gemv()(x), group(x))
    assert torch.equal(layer.bound_gemv()(torch.ones(1, 8)), layer(torch.ones(1, 8)))
