"""SparseLinear(compute_dtype=torch.bfloat16): the bf16 product at batch >= 16, float32 kernels below,
the path visible, errors for formats without a bf16 product, autograd and compress_."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from sparseforge import kernels
from sparseforge.errors import ConfigError
from sparseforge.nn import SparseLinear
from sparseforge.ops.bf16_compute import BF16_MIN_BATCH
from sparseforge.runtime.compress import compress_


def _pruned_linear(inp: int = 72, out: int = 40, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.mul_(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(out, inp // 4))  # 2:4, 50% zeros
    return lin


def _dense_bf16(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """torch's dense bf16 operands, float64 accumulation, float32 bias."""
    w = lin.weight.detach().to(torch.bfloat16).double()
    return (x.to(torch.bfloat16).double() @ w.T + lin.bias.detach().double()).float()


@pytest.mark.parametrize("fmt", ["bitmap", "nm", "csr"])
@pytest.mark.parametrize("values", [torch.float32, torch.bfloat16])
def test_bf16_compute_matches_dense_bf16_from_batch_16(fmt, values):
    lin = _pruned_linear()
    layer = SparseLinear.from_linear(lin, format=fmt, dtype=values, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 8, 72)  # 32 rows: the bf16 product
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (4, 8, 40)
    torch.testing.assert_close(y, _dense_bf16(lin, x.reshape(32, 72)).reshape(4, 8, 40), rtol=1e-4, atol=1e-4)
    assert layer.kernel_path(32) == f"bf16:{kernels.bf16_path()}"


def test_small_batches_keep_the_float32_kernels():
    lin = _pruned_linear()
    fp32 = SparseLinear.from_linear(lin, format="bitmap")
    bf16 = SparseLinear.from_linear(lin, format="bitmap", compute_dtype=torch.bfloat16)
    x = torch.randn(BF16_MIN_BATCH - 1, 72)
    assert torch.equal(bf16(x), fp32(x))  # same kernel, bit for bit
    assert bf16.kernel_path(BF16_MIN_BATCH - 1) == f"fp32:{kernels.isa()}"
    x16 = torch.randn(BF16_MIN_BATCH, 72)
    assert not torch.equal(bf16(x16), fp32(x16))  # bf16 rounding shows from batch 16


def test_bf16_input_gives_bf16_output():
    layer = SparseLinear.from_linear(_pruned_linear(), format="nm", compute_dtype=torch.bfloat16)
    x = torch.randn(20, 72).bfloat16()
    assert layer(x).dtype == torch.bfloat16


def test_path_is_visible_in_repr_and_debug_log(caplog):
    layer = SparseLinear.from_linear(_pruned_linear(), format="csr", compute_dtype=torch.bfloat16)
    assert f"compute=bfloat16 (bf16:{kernels.bf16_path()} from batch 16)" in repr(layer)
    assert "compute=" not in repr(SparseLinear.from_linear(_pruned_linear(), format="csr"))
    with caplog.at_level(logging.DEBUG, logger="sparseforge.ops.bf16_compute"):
        layer(torch.randn(16, 72))
    assert f"path {kernels.bf16_path()}" in caplog.text


def test_formats_without_bf16_product_and_bad_dtypes_raise():
    lin = _pruned_linear()
    fan = SparseLinear.from_linear(lin, format="fanin")
    with pytest.raises(ConfigError, match="fanin"):
        fan.set_compute_dtype(torch.bfloat16)
    with pytest.raises(ConfigError, match="compute_dtype must be"):
        SparseLinear.from_linear(lin, format="bitmap", compute_dtype=torch.float16)


def test_forced_unusable_path_fails_when_set(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_BF16_PATH", "warp")
    with pytest.raises(ConfigError, match="SPARSEFORGE_BF16_PATH"):
        SparseLinear.from_linear(_pruned_linear(), format="bitmap", compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("path", [p for p in kernels.BF16_PATHS if kernels.bf16_path_supported(p)])
def test_each_forced_path_gives_the_same_layer_output(monkeypatch, path):
    layer = SparseLinear.from_linear(_pruned_linear(520, 70), format="bitmap", compute_dtype=torch.bfloat16)
    x = torch.randn(40, 520)
    monkeypatch.setenv("SPARSEFORGE_BF16_PATH", "scalar")
    want = layer(x)
    monkeypatch.setenv("SPARSEFORGE_BF16_PATH", path)
    assert layer.kernel_path(40) == f"bf16:{path}"
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["bitmap", "nm", "csr"])
def test_gradients_flow_through_the_bf16_op(fmt):
    lin = _pruned_linear()
    ref = SparseLinear.from_linear(lin, format=fmt, trainable=True)
    layer = SparseLinear.from_linear(lin, format=fmt, trainable=True, compute_dtype=torch.bfloat16)
    x = torch.randn(24, 72, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    layer(x).square().sum().backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=0.05, atol=0.05)
    torch.testing.assert_close(layer.stored_values.grad, ref.stored_values.grad, rtol=0.05, atol=0.5)
    assert layer.stored_values.grad.abs().sum() > 0


def test_custom_op_passes_opcheck():
    from sparseforge.formats import BitmapWeight
    from sparseforge.ops import bf16_compute as mod

    w = BitmapWeight.from_dense(_pruned_linear().weight.detach())
    x = torch.randn(17, 72).bfloat16()
    torch.library.opcheck(mod.bitmap_linear_bf16, (x, w.bitmap, w.row_offsets, w.values, torch.randn(40)))


def test_compress_sets_the_compute_dtype():
    model = nn.Sequential(_pruned_linear(), nn.ReLU(), _pruned_linear(40, 72, seed=1).requires_grad_(False))
    model[2].weight.data[:, ::2] = 0
    compress_(model, format="bitmap", compute_dtype=torch.bfloat16)
    assert all(m.compute_dtype == torch.bfloat16 for m in model.modules() if isinstance(m, SparseLinear))
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)


def test_docstring_examples_run():
    import doctest

    from sparseforge.ops import bf16_compute

    result = doctest.testmod(bf16_compute)
    assert result.attempted > 0 and result.failed == 0
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(SparseLinear.set_compute_dtype, "set_compute_dtype", globs={"SparseLinear": SparseLinear}):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted > 0 and runner.summarize(verbose=False).failed == 0


def test_bf16_compute_refuses_int8_values_at_construction():
    lin = torch.nn.Linear(64, 32, bias=False)
    with pytest.raises(ConfigError, match="int8 values run the int8 kernels"):
        SparseLinear.from_linear(lin, "bitmap", dtype=torch.int8, compute_dtype=torch.bfloat16)
