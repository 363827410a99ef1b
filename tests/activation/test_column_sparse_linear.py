"""ColumnSparseLinear: a layer both pruned (column bitmap weight) and activation-sparse, as a module,
through column_sparse_, saving, sparseforge.load(sparse=True), generate and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparseforge
from sparseforge.activation import (
    ActivationSparsityConfig, ColumnSparseLinear, SparseInputLinear, column_sparse_, sparse_input_layers,
    sparsify_activations_,
)
from sparseforge.config import CalibrationConfig, SparsifyConfig
from sparseforge.errors import ConfigError, ModelError
from sparseforge.io.checkpoint import save_pretrained
from sparseforge.io.loading import load
from sparseforge.nn import SparseLinear
from sparseforge.ops.sparse_input import sparse_input_reference
from tiny_models import tiny_model, tokens


def _pruned_linear(n_in, n_out, sparsity, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n_out, n_in) >= sparsity)
    return lin


@settings(max_examples=30, deadline=None)
@given(n_in=st.integers(1, 96), n_out=st.integers(1, 700), rows=st.integers(1, 6), sparsity=st.sampled_from([0.0, 0.5, 0.9]),
       thr=st.sampled_from([0.0, 0.3, 1.0, math.inf]), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_the_sparse_input_layer_over_the_pruned_weight(n_in, n_out, rows, sparsity, thr, bf16, seed):
    lin = _pruned_linear(n_in, n_out, sparsity, seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    col = ColumnSparseLinear.from_linear(lin, threshold=thr, dtype=dtype)
    ref = SparseInputLinear.from_linear(lin, threshold=thr, dtype=dtype)
    x = torch.randn(2, rows, n_in)
    tol = dict(rtol=1e-4, atol=1e-4 * math.sqrt(n_in))
    with torch.no_grad():
        # float32 products over the same stored weights (the dense layer's torch path would round x to bf16)
        expected = sparse_input_reference(x.reshape(-1, n_in), ref.weight_t, ref.threshold, ref.bias).reshape(2, rows, n_out)
        torch.testing.assert_close(col(x), expected, **tol)
        torch.testing.assert_close(col(x[:1, :1]), ref(x[:1, :1]), **tol)  # batch 1: both native GEMVs
    assert col.weight_sparsity() == pytest.approx(float((lin.weight == 0).float().mean()))
    assert torch.equal(col.weight, lin.weight.detach().to(dtype))


def test_threshold_zero_is_the_pruned_dense_layer_and_tracking_counts():
    lin = _pruned_linear(64, 300, 0.5)
    col = ColumnSparseLinear.from_linear(lin)
    x = torch.randn(3, 64)
    x[:, :16] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(col(x), lin(x), rtol=1e-5, atol=1e-5)
    col.track_sparsity = True
    col.set_threshold(0.5)
    with torch.no_grad():
        col(x)
    assert col.measured_sparsity() == pytest.approx(float((x.abs() <= 0.5).float().mean()))


def test_token_fraction_keeps_the_prefix_dense():
    lin = _pruned_linear(32, 40, 0.5)
    col = ColumnSparseLinear.from_linear(lin, threshold=1e9)  # every finite input skipped
    col.token_fraction = 0.5
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        y = col(x)
    torch.testing.assert_close(y[:, :2], lin(x[:, :2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, 2:], lin.bias.expand(1, 2, 40))


def test_module_under_torch_compile_and_autograd():
    lin = _pruned_linear(24, 16, 0.5)
    col = ColumnSparseLinear.from_linear(lin, threshold=0.3)
    x = torch.randn(3, 24)
    fn = torch.compile(col, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), col(x))
    xg = x.clone().requires_grad_()
    col(xg).sum().backward()
    keep = (x.abs() > 0.3).float()
    torch.testing.assert_close(xg.grad, (torch.ones(3, 16) @ lin.weight.detach()) * keep, rtol=1e-5, atol=1e-5)


def test_to_bfloat16_casts_the_values_and_keeps_running():
    lin = _pruned_linear(32, 48, 0.5)
    col = ColumnSparseLinear.from_linear(lin, threshold=0.2)
    x = torch.randn(1, 32)
    with torch.no_grad():
        expected = col(x)
        col.to(torch.bfloat16)
        assert col.values.dtype == torch.bfloat16 and col.bitmap.dtype == torch.int64
        torch.testing.assert_close(col(x.bfloat16()).float(), expected, rtol=3e-2, atol=3e-2)


def test_column_sparse_swaps_pruned_sparse_input_layers_only():
    model = nn.Sequential(SparseInputLinear.from_linear(_pruned_linear(16, 16, 0.5), threshold=0.2),
                          SparseInputLinear.from_linear(_pruned_linear(16, 16, 0.0, seed=1), threshold=0.3))
    model[0].activation_info = {"method": "teal", "sparsity": 0.4}
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = model(x)
    assert column_sparse_(model, min_weight_sparsity=0.3) == ["0"]
    assert isinstance(model[0], ColumnSparseLinear) and type(model[1]) is SparseInputLinear
    assert model[0].threshold.item() == pytest.approx(0.2) and model[0].activation_info["method"] == "teal"
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="min_weight_sparsity"):
        column_sparse_(model, min_weight_sparsity=1.5)
    with pytest.raises(ModelError, match="ColumnBitmapWeight"):
        ColumnSparseLinear(torch.zeros(2, 2))
    with pytest.raises(ModelError, match="SparseLinear"):
        ColumnSparseLinear.from_module(nn.ReLU())


def test_from_a_sparse_linear_layer():
    lin = _pruned_linear(40, 24, 0.5)
    sparse = SparseLinear.from_linear(lin, "bitmap")
    col = ColumnSparseLinear.from_module(sparse, threshold=0.4)
    x = torch.randn(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(col(x), lin(torch.where(x.abs() <= 0.4, 0.0, x)), rtol=1e-5, atol=1e-5)


def _pruned_activation_sparse_model():
    model = tiny_model("llama")
    sparseforge.sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.5), progress=False)
    sparsify_activations_(model, ActivationSparsityConfig(method="teal", sparsity=0.5,
                                                          calibration=CalibrationConfig(batch_size=4)),
                          calibration=tokens(8, 16), progress=False)
    return model


def test_pruned_and_activation_sparse_model_saves_loads_sparse_and_generates(tmp_path):
    model = _pruned_activation_sparse_model()
    swapped = column_sparse_(model, min_weight_sparsity=0.4)
    assert len(swapped) == 14
    ids = tokens(2, 12, seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = save_pretrained(model, tmp_path / "c", sparsity_config={"method": "magnitude", "sparsity": 0.5})
    loaded = load(out, sparse=True)
    layers = sparse_input_layers(loaded)
    assert set(layers) == set(swapped) and all(isinstance(m, ColumnSparseLinear) for m in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    generated = loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False))
    dense = load(out)  # dense weights, activation-sparse: the same function
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
