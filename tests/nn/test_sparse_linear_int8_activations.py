"""The int8-activation mode end to end: ``sparseforge.ops`` (``act`` / ``activations``), SparseLinear
(``activations="int8"``, :meth:`set_activation_precision`), ``compress_(..., activations="int8")``,
``set_activation_precision_`` and projection fusion keeping it.

Every result is checked against the native reference of the mode (``*_i8_linear_ref(act="int8")``:
the documented formula, bit-exact on every path) and against the float mode within the documented
bound ``|y_int8 - y_float| <= scales[r] * sum_j |q[r, j]| * sx[b] / 2``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels, ops
from sparseforge.errors import ConfigError
from sparseforge.formats import BitmapWeight, NMWeight
from sparseforge.formats.csr import CSRWeight
from sparseforge.generation.fuse import fuse_projections_, unfuse_projections_
from sparseforge.kernels import native
from sparseforge.nn import SparseLinear
from sparseforge.ops.int8 import bitmap_i8_linear, nm_i8_linear
from sparseforge.runtime.compress import compress_, set_activation_precision_


def _weight(fmt: str, rows: int, cols: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    if fmt == "bitmap":
        return BitmapWeight.from_dense(w, torch.rand(rows, cols, generator=gen) < 0.5, values_dtype=torch.int8)
    keep = torch.tensor([True, False, True, False]).repeat(rows, cols // 4)
    return NMWeight.from_dense(w, "2:4", keep, values_dtype=torch.int8)


def _reference(weight, x: torch.Tensor, bias=None) -> torch.Tensor:
    """The native reference of the int8-activation mode (scalar, the documented formula)."""
    y = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
    b = None if bias is None else bias.detach().numpy()
    if isinstance(weight, BitmapWeight):
        native().bitmap_i8_linear_ref(x.numpy(), weight.bitmap.numpy(), weight.row_offsets.numpy(),
                                      weight.values.numpy(), weight.scales.numpy(), b, y, act="int8")
    else:
        native().nm_i8_linear_ref(x.numpy(), weight.values.numpy(), weight.indices.numpy(), weight.scales.numpy(),
                                  2, 4, b, y, act="int8")
    return torch.from_numpy(y)


def _bound(weight, x: torch.Tensor) -> torch.Tensor:
    """(B, rows) documented deviation of the int8 mode from the float mode, plus float32 rounding."""
    q = torch.round(weight.to_dense() / weight.scales[:, None]).abs().sum(dim=1)  # (rows,)
    sx = x.abs().amax(dim=1) / 127  # (B,)
    return (sx[:, None] / 2) * (weight.scales * q)[None, :] * (1 + 1e-4) + 1e-4


@settings(max_examples=20, deadline=None)
@given(fmt=st.sampled_from(["bitmap", "nm"]), rows=st.integers(1, 40), groups=st.integers(1, 40),
       batch=st.integers(1, 5), bias=st.booleans(), seed=st.integers(0, 10_000))
def test_layer_in_int8_mode_is_the_reference_and_within_the_bound_of_float_mode(fmt, rows, groups, batch, bias, seed):
    weight = _weight(fmt, rows, 4 * groups, seed)
    b = torch.randn(rows) if bias else None
    layer = SparseLinear(weight, b, activations="int8")
    x = torch.randn(batch, 4 * groups, generator=torch.Generator().manual_seed(seed + 1))
    y = layer(x)
    assert torch.equal(y, _reference(weight, x, layer.bias))
    y_float = layer.set_activation_precision("float")(x)
    assert ((y - y_float).abs() <= _bound(weight, x)).all()
    assert not torch.equal(y, y_float) or rows * groups < 4  # the mode does change the numerics


@pytest.mark.parametrize("fmt", ["bitmap", "nm"])
def test_ops_linear_and_the_registered_op_run_the_mode(fmt):
    weight = _weight(fmt, 24, 64, 3)
    x, bias = torch.randn(2, 3, 64), torch.randn(24)
    expected = _reference(weight, x.reshape(6, 64), bias).reshape(2, 3, 24)
    assert torch.equal(ops.linear(x, weight, bias, activations="int8"), expected)  # eager fast path
    op = bitmap_i8_linear if fmt == "bitmap" else nm_i8_linear
    args = ((weight.bitmap, weight.row_offsets, weight.values, weight.scales) if fmt == "bitmap"
            else (weight.values, weight.indices, weight.scales, 2, 4))
    assert torch.equal(op(x.reshape(6, 64), *args, bias, "int8"), expected.reshape(6, 24))
    assert torch.equal(op(x.reshape(6, 64), *args, bias), ops.linear(x.reshape(6, 64), weight, bias))  # default: float
    torch.library.opcheck(op, (x.reshape(6, 64), *args, bias, "int8"), test_utils=("test_schema", "test_faketensor"))


def test_nan_input_runs_the_float_mode():
    weight = _weight("nm", 8, 16, 0)
    x = torch.randn(1, 16)
    x[0, 3] = float("nan")
    x[0, 5] = 1.0
    y = SparseLinear(weight, activations="int8")(x)
    torch.testing.assert_close(y, SparseLinear(weight)(x), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(y).all()  # as the dense product: NaN * 0 is NaN


def test_int8_mode_is_inference_only():
    weight = _weight("nm", 8, 16, 0)
    layer = SparseLinear(weight, activations="int8")
    x = torch.randn(2, 16, requires_grad=True)
    with pytest.raises(ConfigError, match="inference-only"):
        layer(x)
    with pytest.raises(ConfigError, match="inference-only"):  # the registered op itself, too
        nm_i8_linear(x, weight.values, weight.indices, weight.scales, 2, 4, None, "int8")
    with torch.no_grad():
        assert torch.equal(layer(x), _reference(weight, x.detach()))
    y = layer.set_activation_precision("float")(x)  # the float mode trains through x
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_mode_is_refused_where_it_does_not_exist():
    w = torch.randn(8, 16) * torch.tensor([1.0, 0.0] * 8)
    with pytest.raises(ConfigError, match="int8 values"):
        SparseLinear(BitmapWeight.from_dense(w), activations="int8")  # float32 values
    with pytest.raises(ConfigError, match="int8 values"):
        SparseLinear(CSRWeight.from_dense(w, w != 0, values_dtype=torch.int8)).set_activation_precision("int8")
    with pytest.raises(ConfigError, match="activations must be one of"):
        SparseLinear(_weight("nm", 8, 16, 0), activations="int4")
    with pytest.raises(ConfigError, match="needs a bitmap or N:M weight with int8 values"):
        ops.linear(torch.randn(1, 16), BitmapWeight.from_dense(w), activations="int8")
    trainable = SparseLinear(BitmapWeight.from_dense(w), trainable=True)
    with pytest.raises(ConfigError, match="int8 values"):
        trainable.set_activation_precision("int8")


def test_layer_reports_its_path_and_pickles_with_the_mode():
    layer = SparseLinear(_weight("nm", 8, 16, 0))
    assert layer.activations == "float" and layer.kernel_path(1).startswith("fp32:")
    layer.set_activation_precision("int8")
    assert layer.kernel_path(1) == f"int8:{kernels.int8_act_path()}" and "activations=int8" in repr(layer)
    assert kernels.int8_act_path("scalar") == "portable"
    import copy

    clone = copy.deepcopy(layer)
    assert clone.activations == "int8"
    assert "nm_values" in layer.state_dict()  # a runtime setting: the state holds only the weight


def _pruned_net(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight.mul_(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(lin.in_features // 4))
    return net


def test_compress_sets_the_mode_and_reports_it():
    net = _pruned_net()
    x = torch.randn(3, 32)
    report = compress_(net, format="nm", dtype=torch.int8, activations="int8")
    assert [c.activations for c in report.converted] == ["int8", "int8"]
    assert "int8 activations" in report.summary()
    assert net[0].activations == net[2].activations == "int8"
    h = _reference(net[0].weight_format, x, net[0].bias)
    assert torch.equal(net(x), _reference(net[2].weight_format, torch.relu(h), net[2].bias))
    assert set_activation_precision_(net, "float") == ["0", "2"] and net[0].activations == "float"
    assert set_activation_precision_(net, "int8", ignore=["2"]) == ["0"]  # a per-layer opt-out
    assert (net[0].activations, net[2].activations) == ("int8", "float")
    with pytest.raises(ConfigError, match="list of module-name patterns"):
        set_activation_precision_(net, "int8", ignore="2")


def test_compress_refuses_the_mode_without_int8_values():
    with pytest.raises(ConfigError, match="needs int8 values"):
        compress_(_pruned_net(), format="nm", dtype=torch.float32, activations="int8")
    with pytest.raises(ConfigError, match="no converted layer"):
        compress_(_pruned_net(), format="csr", dtype=torch.int8, activations="int8")
    net = _pruned_net()
    compress_(net, format="csr", dtype=torch.int8)
    with pytest.raises(ConfigError, match="none qualifies"):
        set_activation_precision_(net, "int8")


def test_fused_projections_keep_int8_values_and_the_mode():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(16, n) for n in (8, 4, 4))

        def forward(self, x):
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    torch.manual_seed(0)
    block = Block()
    for name in ("q_proj", "k_proj", "v_proj"):
        lin = getattr(block, name)
        with torch.no_grad():
            lin.weight.mul_(torch.tensor([0.0, 1.0, 1.0, 0.0]).repeat(4))
        setattr(block, name, SparseLinear.from_linear(lin, "nm", dtype=torch.int8, activations="int8"))
    originals = [getattr(block, n).weight_format for n in ("q_proj", "k_proj", "v_proj")]
    x = torch.randn(1, 16)
    with torch.no_grad():
        expected = block(x)
        fuse_projections_(block)
        fused = block.fused_q_k_v.layer
        assert fused.weight_format.dtype == torch.int8 and fused.activations == "int8"
        assert torch.equal(block(x), expected)  # one quantization of x serves every fused row
        unfuse_projections_(block)
        assert torch.equal(block(x), expected)
    for name, original in zip(("q_proj", "k_proj", "v_proj"), originals):
        layer = getattr(block, name)
        assert isinstance(layer, SparseLinear) and layer.activations == "int8"
        assert torch.equal(layer.weight_format.values, original.values)
        assert torch.equal(layer.weight_format.scales, original.scales)


@pytest.mark.slow
def test_int8_mode_under_torch_compile_is_the_eager_result():
    layer = SparseLinear(_weight("nm", 16, 32, 5), torch.randn(16), activations="int8")
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), _reference(layer.weight_format, x, layer.bias))
