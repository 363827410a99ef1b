"""ops.BoundLinear (the decode loop's pre-bound linear) against ops.linear, bitwise, for every format and int8 values."""

from __future__ import annotations

import pytest
import torch
from test_kernel_ops import WEIGHTS, _weight

from sparseforge import ops
from sparseforge.errors import ConfigError, DataError
from sparseforge.nn import SparseLinear


@pytest.mark.parametrize("name", WEIGHTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_bound_linear_equals_linear_bitwise(name, batch):
    weight, _ = _weight(name)
    bias = torch.randn(weight.shape[0])
    bound = ops.BoundLinear(weight, bias)
    for seed in range(3):  # the bound views keep working call after call
        x = torch.randn(batch, weight.shape[1], generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert torch.equal(bound(x), ops.linear(x, weight, bias))
    out = torch.empty(batch, weight.shape[0])
    assert bound(x, out=out) is out and torch.equal(out, ops.linear(x, weight, bias))
    assert torch.equal(ops.BoundLinear(weight)(x), ops.linear(x, weight))
    x_buf, out_buf = torch.empty(batch, weight.shape[1]), torch.empty(batch, weight.shape[0])
    call = bound.bind(x_buf, out_buf)  # a decode loop's fixed buffers: the call reads x_buf's current contents
    for seed in range(2):
        x_buf.copy_(torch.randn(batch, weight.shape[1], generator=torch.Generator().manual_seed(10 + seed)))
        call()
        with torch.no_grad():
            assert torch.equal(out_buf, ops.linear(x_buf, weight, bias))


@pytest.mark.parametrize("fmt, pattern", [("bitmap", None), ("nm", "2:4"), ("csr", None)])
def test_bound_linear_runs_int8_values_like_the_layer(fmt, pattern):
    torch.manual_seed(1)
    dense = torch.nn.Linear(64, 24)
    with torch.no_grad():
        dense.weight[:, 1::2] = 0
    layer = SparseLinear.from_linear(dense, format=fmt, pattern=pattern, dtype=torch.int8)
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert torch.equal(ops.BoundLinear(layer.weight_format, layer.bias.detach())(x), layer(x))


@pytest.mark.parametrize("fmt, pattern", [("bitmap", None), ("nm", "2:4")])
def test_bound_linear_runs_int8_activations_like_the_layer(fmt, pattern):
    torch.manual_seed(2)
    dense = torch.nn.Linear(96, 40)
    with torch.no_grad():
        dense.weight[:, ::2] = 0
    layer = SparseLinear.from_linear(dense, format=fmt, pattern=pattern, dtype=torch.int8, activations="int8")
    bound = ops.BoundLinear(layer.weight_format, layer.bias.detach(), activations="int8")
    float_mode = ops.BoundLinear(layer.weight_format, layer.bias.detach())
    x = torch.randn(1, 96)
    with torch.no_grad():
        assert torch.equal(bound(x), layer(x))
        assert not torch.equal(float_mode(x), layer(x))  # the mode is what the bound call runs


def test_bound_linear_refuses_int8_activations_without_int8_values():
    weight, _ = _weight("bitmap")
    with pytest.raises(ConfigError, match="int8"):
        ops.BoundLinear(weight, activations="int8")


def test_bound_linear_checks_its_inputs():
    weight, _ = _weight("bitmap")
    bound = ops.BoundLinear(weight)
    rows, cols = weight.shape
    with pytest.raises(DataError, match="float32"):
        bound(torch.randn(1, cols).double())
    with pytest.raises(DataError, match="shape"):
        bound(torch.randn(1, cols + 1))
    with pytest.raises(DataError, match="contiguous"):
        bound(torch.randn(cols, 2).t())
    with pytest.raises(DataError, match="out must be"):
        bound(torch.randn(1, cols), out=torch.empty(2, rows))
    with pytest.raises(DataError, match="out must be"):
        bound.bind(torch.randn(1, cols), torch.empty(1, rows + 1))
    with pytest.raises(DataError, match="bias"):
        ops.BoundLinear(weight, torch.zeros(rows + 1))
