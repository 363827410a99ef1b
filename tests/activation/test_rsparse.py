"""R-Sparse: the budget split, the layer's invariants, calibration, checkpoints, and its error against TEAL."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseforge.activation import ActivationSparsityConfig, SparseInputLinear, sparse_input_layers, sparsify_activations_
from sparseforge.activation.calibrate import Histogram
from sparseforge.activation.config import RSPARSE_RATIOS
from sparseforge.activation.rsparse import RSparseLinear, calibrate_rsparse, column_norms, rsparse_budget
from sparseforge.config import CalibrationConfig
from sparseforge.errors import ConfigError
from tiny_models import tiny_model, tokens


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4096), st.integers(1, 4096), st.floats(0.0, 0.99), st.floats(0.0, 1.0))
def test_budget_never_exceeds_the_bytes_of_the_sparsity(n_in, n_out, sparsity, rho):
    channel_sparsity, rank = rsparse_budget(n_in, n_out, sparsity, rho)
    kept = int(n_in * (1 - sparsity) * rho)
    budget = (1 - sparsity) * n_in * n_out
    used = kept * n_out + rank * (n_in + n_out)
    assert used <= budget + 1e-6 * budget + 1e-9
    if rank < min(n_in, n_out):  # the rank is as large as the budget allows
        assert used + (n_in + n_out) > budget
    assert 0 <= rank <= min(n_in, n_out)
    assert channel_sparsity == pytest.approx(1 - (1 - sparsity) * rho)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.floats(0.0, 3.0) | st.just(math.inf), st.integers(0, 2**31 - 1))
def test_full_rank_is_exact_at_any_threshold(n_in, n_out, threshold, seed):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(n_in, n_out)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(n_out, n_in, generator=g))
    layer = RSparseLinear.from_linear(dense, threshold=threshold, rank=min(n_in, n_out))
    x = torch.randn(3, n_in, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-4, atol=1e-4)


def test_rank_zero_is_the_sparse_input_layer():
    dense = nn.Linear(32, 16)
    t = torch.rand(32)
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(RSparseLinear.from_linear(dense, threshold=t, rank=0)(x),
                                   SparseInputLinear.from_linear(dense, threshold=t)(x))


def test_low_rank_term_carries_exactly_the_skipped_channels():
    torch.manual_seed(0)
    dense = nn.Linear(32, 24, bias=False)
    layer = RSparseLinear.from_linear(dense, threshold=0.5, rank=6)
    x = torch.randn(5, 32)
    skipped = torch.where(x.abs() <= 0.5, x, torch.zeros(()))
    u, s, vh = torch.linalg.svd(dense.weight.detach().double(), full_matrices=False)
    w6 = (u[:, :6] * s[:6]) @ vh[:6]  # (out, in) rank-6 approximation
    expected = (x - skipped) @ dense.weight.detach().t() + (skipped.double() @ w6.t()).float()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_calibration_thresholds_scale_by_column_norm_and_reach_the_channel_sparsity():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.linspace(0.1, 3.0, 128)  # (out, in), columns of growing norm
    xs = [torch.randn(200, 128) for _ in range(3)]
    t, per_channel, rank, skipped, rho = calibrate_rsparse(w, xs, 0.5, 0.95)
    channel_sparsity, expected_rank = rsparse_budget(128, 64, 0.5, 0.95)
    assert rho == 0.95 and rank == expected_rank and skipped == pytest.approx(channel_sparsity, abs=0.01)
    torch.testing.assert_close(per_channel * column_norms(w), torch.full((128,), t), rtol=1e-5, atol=1e-6)
    assert per_channel[0] > per_channel[-1]  # small columns are skipped more easily


def test_sparsify_activations_rsparse_and_checkpoint_round_trip(tmp_path):
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.layout import read_sparsity_config
    from sparseforge.io.loading import load

    model = tiny_model("llama")
    report = sparsify_activations_(model, ActivationSparsityConfig(method="rsparse", sparsity=0.5, calibration=CalibrationConfig(
        batch_size=4)), calibration=tokens(8, 16), progress=False)
    layers = sparse_input_layers(model)
    assert len(layers) == 14 and all(isinstance(m, RSparseLinear) for m in layers.values())
    for name, m in layers.items():
        assert m.threshold.numel() == m.in_features
        assert m.rank in {rsparse_budget(m.in_features, m.out_features, 0.5, rho)[1] for rho in RSPARSE_RATIOS}
    assert "R-Sparse" in report.summary()
    ids = tokens(2, 10, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = save_pretrained(model, tmp_path / "c", compressed=False)
    entry = read_sparsity_config(out)["activation"]["layers"]["model.layers.0.mlp.down_proj"]
    assert entry["kind"] == "rsparse" and entry["rank"] == layers["model.layers.0.mlp.down_proj"].rank
    loaded = load(out)
    assert all(isinstance(m, RSparseLinear) for m in sparse_input_layers(loaded).values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="one calibration"):
        report.retarget_(model, 0.4)


def test_config_errors():
    with pytest.raises(ConfigError, match="uniform"):
        ActivationSparsityConfig(method="rsparse", allocation="greedy")
    with pytest.raises(ConfigError, match="rsparse_ratio"):
        ActivationSparsityConfig(method="rsparse", rsparse_ratio=1.5)
    with pytest.raises(ConfigError, match="rsparse_ratio"):
        ActivationSparsityConfig(method="rsparse", rsparse_ratio=[])


@pytest.fixture(scope="module")
def builtin_inputs():
    """Inputs of every projection of blocks 0, 1 and 4 of the built-in model on built-in text (dense model)."""
    from sparseforge.data.calibration import calibration_tokens
    from sparseforge.io.models import load_model

    loaded = load_model("builtin")
    ids = calibration_tokens(loaded.tokenizer, CalibrationConfig(samples=8, seqlen=128, seed=1))
    modules = {f"{b}.{n}": m for b in (0, 1, 4) for n, m in loaded.model.model.layers[b].named_modules()
               if isinstance(m, nn.Linear)}
    seen = {n: [] for n in modules}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
               for n, m in modules.items()]
    with torch.no_grad():
        loaded.model(input_ids=ids)
    for h in handles:
        h.remove()
    return modules, {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("sparsity", [0.4, 0.5, 0.65])
def test_rsparse_beats_teal_output_error_at_equal_bytes(builtin_inputs, sparsity):
    """Calibrated on the first half of the tokens, measured on the other half, at the same weight bytes
    read: R-Sparse's output error is below TEAL's on every projection of blocks 1 and 4 of the trained
    built-in model, and on average over block 0 (whose down_proj at 40% and o_proj at 65% are within
    about 1% above TEAL: docs/activation.md)."""
    modules, inputs = builtin_inputs
    ratios = {}
    for name, linear in modules.items():
        x = inputs[name]  # (tokens, in)
        calib, held = x[: len(x) // 2], x[len(x) // 2:]
        teal = SparseInputLinear.from_linear(linear, threshold=Histogram.of(calib.abs()).threshold(sparsity, signed=False))
        _, per_channel, rank, _, _ = calibrate_rsparse(linear.weight, [calib], sparsity, RSPARSE_RATIOS)
        rs = RSparseLinear.from_linear(linear, threshold=per_channel, rank=rank)
        with torch.no_grad():
            dense = linear(held)
            err_teal = float(torch.linalg.vector_norm(teal(held) - dense))
            err_rs = float(torch.linalg.vector_norm(rs(held) - dense))
        n_in, n_out = linear.in_features, linear.out_features
        bytes_teal = float((held.abs() > teal.threshold).float().mean()) * n_in * n_out
        bytes_rs = float((held.abs() > per_channel).float().mean()) * n_in * n_out + rank * (n_in + n_out)
        assert bytes_rs <= bytes_teal * 1.03, (name, bytes_rs, bytes_teal)
        ratios[name] = err_rs / err_teal
    worse = {n: r for n, r in ratios.items() if r >= 1.0 and not n.startswith("0.")}
    assert not worse, worse
    block0 = [r for n, r in ratios.items() if n.startswith("0.")]
    assert sum(block0) / len(block0) < 0.99, block0


def test_rho_search_is_no_worse_than_any_fixed_rho_on_its_calibration_data(builtin_inputs):
    modules, inputs = builtin_inputs
    name = "1.self_attn.o_proj"
    linear, x = modules[name], inputs[name]
    errors = {}
    for rho in (*RSPARSE_RATIOS, RSPARSE_RATIOS):
        _, per_channel, rank, _, chosen = calibrate_rsparse(linear.weight, [x], 0.5, rho)
        with torch.no_grad():
            rs = RSparseLinear.from_linear(linear, threshold=per_channel, rank=rank)
            errors[rho if isinstance(rho, float) else "search"] = float(torch.linalg.vector_norm(rs(x) - linear(x)))
    assert errors["search"] <= min(v for k, v in errors.items() if k != "search") * (1 + 1e-4), errors


def test_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    layer = RSparseLinear.from_linear(nn.Linear(32, 24), threshold=torch.rand(32), rank=4)
    x = torch.randn(3, 32)
    with torch.no_grad():
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x))


def test_a_checkpoint_rank_out_of_range_is_refused_naming_the_layer(tmp_path):
    import json

    from sparseforge.errors import ModelError
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.loading import load

    model = tiny_model("llama")
    sparsify_activations_(model, ActivationSparsityConfig(method="rsparse", sparsity=0.5, rsparse_ratio=0.9,
                                                          calibration=CalibrationConfig(batch_size=4)),
                          calibration=tokens(4, 16), progress=False)
    out = save_pretrained(model, tmp_path / "c", compressed=False)
    data = json.loads((out / "config.json").read_text())
    data["sparsity_config"]["activation"]["layers"]["model.layers.1.mlp.down_proj"]["rank"] = 33
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"down_proj needs a rank in \[0, 32\], got 33"):
        load(out)
