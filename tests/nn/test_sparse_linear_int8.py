"""SparseLinear with int8 values: from_linear, forward through the int8 ops, dx autograd, buffers."""

from __future__ import annotations

import pytest
import torch

from sparseforge.errors import ConfigError
from sparseforge.nn import SparseLinear
from sparseforge.ops.int8 import bitmap_i8_linear, csr_i8_linear, nm_i8_linear


def _pruned_linear(out=24, inp=64, seed=0, two_four=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(inp, out)
    with torch.no_grad():
        if two_four:
            lin.weight.mul_(torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(inp // 4))
        else:
            lin.weight.mul_(torch.rand(out, inp) < 0.4)
    return lin


def _quantized(lin):
    """What sparseforge.quant leaves: weight = q * scale (float32) and a weight_scale buffer (out,)."""
    scale = lin.weight.detach().abs().amax(dim=1) / 127
    with torch.no_grad():
        lin.weight.copy_(torch.round(lin.weight / scale[:, None]) * scale[:, None])
    lin.register_buffer("weight_scale", scale.clone())
    return lin


@pytest.mark.parametrize("fmt", ["bitmap", "nm", "csr", "auto"])
def test_forward_matches_the_dequantized_dense_layer(fmt):
    lin = _pruned_linear()
    sl = SparseLinear.from_linear(lin, fmt, dtype=torch.int8)
    assert sl.weight_format.dtype == torch.int8 and "values=int8" in repr(sl)
    ref = torch.nn.Linear(64, 24)
    with torch.no_grad():
        ref.weight.copy_(sl.to_dense())
        ref.bias.copy_(lin.bias)
    assert (sl.to_dense() - lin.weight).abs().max() <= sl.weight_format.scales.max() / 2 + 1e-7
    for x in (torch.randn(64), torch.randn(1, 64), torch.randn(3, 5, 64), torch.randn(70, 64).bfloat16()):
        y = sl(x)
        assert y.dtype == x.dtype and y.shape == ref(x.float()).shape
        torch.testing.assert_close(y.float(), ref(x.float()), rtol=1e-2 if x.dtype == torch.bfloat16 else 1e-4,
                                   atol=1e-2 if x.dtype == torch.bfloat16 else 1e-4)


def test_weight_scale_buffer_is_the_grid():
    lin = _quantized(_pruned_linear(seed=1))
    sl = SparseLinear.from_linear(lin, "nm", dtype=torch.int8)
    assert torch.equal(sl.weight_format.scales, lin.weight_scale)
    assert torch.equal(sl.to_dense(), lin.weight.detach())  # exactly q * scale
    with torch.no_grad():
        lin.weight[0, 0] += lin.weight_scale[0] * 0.3  # off the grid
    with pytest.raises(ConfigError, match=r"weight \[0, 0\].*not on its row's int8 grid"):
        SparseLinear.from_linear(lin, "nm", dtype=torch.int8)


def test_input_gradient_flows_and_int8_is_not_trainable():
    lin = _pruned_linear(two_four=False)
    for fmt in ("bitmap", "csr", "nm"):
        sl = SparseLinear.from_linear(lin if fmt != "nm" else _pruned_linear(), fmt, dtype=torch.int8)
        x = torch.randn(4, 64, requires_grad=True)
        sl(x).pow(2).sum().backward()
        xr = x.detach().clone().requires_grad_()
        torch.nn.functional.linear(xr, sl.to_dense(), sl.bias).pow(2).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
        assert sl.bias.grad is None  # inference layers: the bias does not train
    with pytest.raises(ConfigError, match="int8 values cannot be trainable"):
        sl.set_trainable(True)
    with pytest.raises(ConfigError, match="int8 values cannot be trainable"):
        SparseLinear.from_linear(lin, "bitmap", dtype=torch.int8, trainable=True)


def test_state_dict_round_trip_and_formats_without_int8():
    lin = _pruned_linear()
    sl = SparseLinear.from_linear(lin, "nm", dtype=torch.int8)
    state = sl.state_dict()
    assert state["nm_values"].dtype == torch.int8 and state["nm_scales"].dtype == torch.float32
    other = SparseLinear.from_linear(_pruned_linear(seed=5), "nm", dtype=torch.int8)
    other.load_state_dict(state)
    x = torch.randn(2, 64)
    torch.testing.assert_close(other(x), sl(x))
    with pytest.raises(ConfigError, match="int8 values are stored in the bitmap / nm / csr formats, not 'fanin'"):
        SparseLinear.from_linear(lin, "fanin", dtype=torch.int8)
    with pytest.raises(ConfigError, match="scales= needs dtype=torch.int8"):
        SparseLinear.from_linear(lin, "bitmap", scales=torch.ones(24))


def test_ops_pass_opcheck():
    sl = SparseLinear.from_linear(_pruned_linear(), "nm", dtype=torch.int8)
    w = sl.weight_format
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(nm_i8_linear, (x, w.values, w.indices, w.scales, 2, 4, sl.bias.detach()))
    bw = SparseLinear.from_linear(_pruned_linear(two_four=False), "bitmap", dtype=torch.int8).weight_format
    torch.library.opcheck(bitmap_i8_linear, (x, bw.bitmap, bw.row_offsets, bw.values, bw.scales, None))
    cw = SparseLinear.from_linear(_pruned_linear(two_four=False), "csr", dtype=torch.int8).weight_format
    torch.library.opcheck(csr_i8_linear, (x, cw.row_ptr, cw.col, cw.values, cw.scales, None))
