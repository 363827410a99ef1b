"""compress_ with int8 values: quantized layers (a weight_scale buffer) keep their grid, dtype=int8 quantizes."""

from __future__ import annotations

import pytest
import torch

from sparseforge.errors import NumericalError
from sparseforge.nn import SparseLinear
from sparseforge.runtime.compress import compress_


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    with torch.no_grad():
        net[0].weight.mul_(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(8))  # 2:4
        net[2].weight.mul_(torch.rand(16, 48) < 0.3)  # unstructured 70%
    return net


def _quantize(lin):
    scale = lin.weight.detach().abs().amax(dim=1) / 127
    with torch.no_grad():
        lin.weight.copy_(torch.round(lin.weight / scale[:, None]) * scale[:, None])
    lin.register_buffer("weight_scale", scale)


@pytest.mark.parametrize("format", ["rule", "auto"])
def test_quantized_layers_compress_to_int8_on_their_grid(format):
    net = _net()
    _quantize(net[0])
    _quantize(net[2])
    x = torch.randn(5, 32)
    want = net(x)
    scales = [net[0].weight_scale.clone(), net[2].weight_scale.clone()]
    report = compress_(net, format=format, min_sparsity=0.0, batch_sizes=(1,))
    converted = {c.name: c for c in report.converted}
    for i, idx in enumerate((0, 2)):
        sl = net[idx]
        if str(idx) not in converted:  # "auto" may keep a layer dense when it measures faster
            continue
        assert isinstance(sl, SparseLinear) and sl.weight_format.dtype == torch.int8
        assert torch.equal(sl.weight_format.scales, scales[i])
        assert sl.format in ("bitmap", "nm")
    if format == "rule":
        assert converted["0"].format == "nm 2:4" and converted["2"].format == "bitmap"
        assert converted["0"].nbytes == 48 * 16 + 48 * 4 + 48 * 4  # int8 values, 2-bit indices, scales
    torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-4)


def test_dtype_int8_quantizes_round_to_nearest_and_float_dtype_ignores_scales():
    net = _net()
    w0 = net[0].weight.detach().clone()
    compress_(net, format="rule", dtype=torch.int8)
    assert net[0].weight_format.dtype == torch.int8
    assert (net[0].to_dense() - w0).abs().max() <= net[0].weight_format.scales.max() / 2 + 1e-7
    net = _net()
    _quantize(net[0])
    compress_(net, format="rule", dtype=torch.float32)
    assert net[0].weight_format.dtype == torch.float32


def test_nonfinite_weight_names_the_layer_and_changes_nothing():
    net = _net()
    with torch.no_grad():
        net[2].weight[3, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"layer 2: weight \[3, 0\] is nan"):
        compress_(net, format="rule", dtype=torch.int8)
    assert type(net[0]) is torch.nn.Linear and type(net[2]) is torch.nn.Linear
