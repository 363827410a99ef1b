"""SparseInputLinear: the nn module over the sparse-input kernel."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseforge.activation import SparseInputLinear
from sparseforge.errors import ConfigError, ModelError
from sparseforge.ops.sparse_input import sparse_input_masked


def _pair(n_in=48, n_out=24, bias=True, dtype=torch.float32):
    dense = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    return dense, SparseInputLinear.from_linear(dense)


@pytest.mark.parametrize("bias", [True, False])
def test_threshold_zero_matches_the_linear(bias):
    dense, layer = _pair(bias=bias)
    x = torch.randn(2, 5, 48)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert layer.weight.shape == dense.weight.shape and torch.equal(layer.weight, dense.weight)


@settings(max_examples=25, deadline=None)
@given(t=st.floats(0.0, 3.0), tokens=st.integers(1, 6), seed=st.integers(0, 1000))
def test_property_equals_linear_on_masked_input(t, tokens, seed):
    torch.manual_seed(seed)
    dense, layer = _pair()
    layer.set_threshold(t)
    x = torch.randn(3, tokens, 48)
    expect = dense(sparse_input_masked(x, torch.tensor([t])))
    torch.testing.assert_close(layer(x), expect, rtol=1e-4, atol=1e-4)


def test_bf16_model_keeps_bf16_weights_and_output_dtype():
    dense, layer = _pair(dtype=torch.bfloat16)
    assert layer.weight_t.dtype == torch.bfloat16
    x = torch.randn(1, 48, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), dense(x).float(), rtol=2e-2, atol=2e-2)


def test_infinite_threshold_gives_the_bias():
    dense, layer = _pair()
    layer.set_threshold(math.inf)
    y = layer(torch.randn(4, 48))
    torch.testing.assert_close(y, dense.bias.detach().expand(4, 24))


def test_token_fraction_sparsifies_only_the_suffix():
    dense, layer = _pair()
    layer.set_threshold(0.7)
    layer.token_fraction = 0.5
    x = torch.randn(2, 7, 48)
    y = layer(x)
    torch.testing.assert_close(y[:, :4], dense(x[:, :4]), rtol=1e-5, atol=1e-5)  # 7 - int(3.5) = 4 dense
    torch.testing.assert_close(y[:, 4:], dense(sparse_input_masked(x[:, 4:], torch.tensor([0.7]))), rtol=1e-5, atol=1e-5)
    single = layer(x[:, :1])  # one token (decode) is always sparsified
    torch.testing.assert_close(single, dense(sparse_input_masked(x[:, :1], torch.tensor([0.7]))), rtol=1e-5, atol=1e-5)


def test_tracking_counts_skipped_channels():
    _, layer = _pair()
    layer.set_threshold(0.5)
    layer.track_sparsity = True
    x = torch.randn(10, 48)
    layer(x)
    assert layer.measured_sparsity() == pytest.approx(float((x.abs() <= 0.5).float().mean()))


def test_bad_thresholds_and_layers():
    _, layer = _pair()
    with pytest.raises(ConfigError, match="threshold"):
        layer.set_threshold(-0.1)
    with pytest.raises(ConfigError, match="threshold"):
        layer.set_threshold(float("nan"))
    with pytest.raises(ConfigError, match="48 entries"):
        layer.set_threshold(torch.ones(3))
    with pytest.raises(ModelError, match="nn.Linear"):
        SparseInputLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_state_dict_round_trip():
    _, layer = _pair()
    layer.set_threshold(0.25)
    other = SparseInputLinear(48, 24)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 48)
    assert torch.equal(other(x), layer(x)) and other.threshold.item() == 0.25


def test_compiles():
    dense, layer = _pair()
    layer.set_threshold(0.3)
    x = torch.randn(2, 48)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_module_to_bfloat16_keeps_working():
    dense, layer = _pair()
    layer.set_threshold(0.3)
    layer.to(torch.bfloat16)  # weight_t, bias and the threshold buffer all become bf16
    assert layer.weight_t.dtype == torch.bfloat16
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    expect = dense(sparse_input_masked(x.float(), layer.threshold.float()))  # the bf16-rounded threshold
    torch.testing.assert_close(layer(x).float(), expect, rtol=3e-2, atol=3e-2)


def test_eager_fast_path_sees_new_and_changed_tensors():
    import copy

    dense, layer = _pair()
    x = torch.randn(1, 48)
    layer.set_threshold(0.2)
    first = layer(x)  # builds the cached views
    layer.set_threshold(0.9)  # a new threshold tensor
    torch.testing.assert_close(layer(x), dense(sparse_input_masked(x, torch.tensor([0.9]))), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.threshold.fill_(0.2)  # in place: the cached view shares the memory
        layer.weight_t.mul_(2.0)
    torch.testing.assert_close(layer(x) - layer.bias, 2 * (first - layer.bias), rtol=1e-5, atol=1e-5)
    clone = copy.deepcopy(layer)
    assert clone._gemv is None
    with torch.no_grad():
        clone.weight_t.zero_()
    torch.testing.assert_close(clone(x), clone.bias.detach().expand(1, 24))
    assert not torch.equal(layer(x), clone(x))
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()  # autograd takes the registered op, not the fast path
    assert xg.grad is not None and xg.grad.shape == (1, 48)


def test_importing_the_activation_package_stays_cheap():
    import subprocess
    import sys

    code = "import sys, sparseforge.activation; print('transformers' in sys.modules, 'sparseforge._native' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
