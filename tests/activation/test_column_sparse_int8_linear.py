"""ColumnSparseLinear with int8 values: from an int8 SparseLinear, from a float layer with dtype=int8,
and through the load path (a pruned + int8 checkpoint loaded sparse, its thresholds applied): the
layers keep int8 values and their row scales, and compute the dequantized pruned layer."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sparseforge
from sparseforge.activation import ColumnSparseLinear
from sparseforge.activation.storage import FILE_NAME, FORMAT_VERSION, load_activation_sparsity_
from sparseforge.config import SparsifyConfig
from sparseforge.errors import ConfigError
from sparseforge.formats import BitmapWeight, NMWeight
from sparseforge.io.checkpoint import save_pretrained
from sparseforge.io.loading import load
from sparseforge.nn import SparseLinear
from sparseforge.quant import QuantConfig, quantize_
from tiny_models import tiny_model, tokens


def _pruned_linear(n_in, n_out, sparsity, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n_out, n_in) >= sparsity)
    return lin


def _masked(x, thr):
    return torch.where(x.abs() <= thr, 0.0, x)


@pytest.mark.parametrize("fmt", ["bitmap", "nm"])
def test_from_an_int8_sparse_linear_keeps_int8(fmt):
    lin = _pruned_linear(64, 48, 0.6)
    w = lin.weight.detach()
    if fmt == "nm":
        w = w.clone()
        w.view(48, 16, 4)[:, :, 2:] = 0.0  # 2:4
        src = NMWeight.from_dense(w, "2:4", values_dtype=torch.int8)
    else:
        src = BitmapWeight.from_dense(w, values_dtype=torch.int8)
    sparse = SparseLinear(src, lin.bias.detach())
    col = ColumnSparseLinear.from_module(sparse, threshold=0.3)
    assert col.values.dtype == torch.int8 and torch.equal(col.scales, src.scales)
    assert torch.equal(col.weight_format.to_dense(), src.to_dense())
    assert "values=int8" in repr(col)
    x = torch.randn(1, 64)
    x[0, 5] = 0.0
    with torch.no_grad():
        want = torch.nn.functional.linear(_masked(x, 0.3), src.to_dense(), lin.bias)
        torch.testing.assert_close(col(x), want, rtol=1e-5, atol=1e-4)  # decode: GEMV
        xb = torch.randn(40, 64)
        torch.testing.assert_close(col(xb), torch.nn.functional.linear(_masked(xb, 0.3), src.to_dense(), lin.bias),
                                   rtol=1e-5, atol=1e-4)  # prefill: decoded-panel GEMM
    # autograd for x through the registered op: the dequantized weight, masked channels 0
    xg = x.clone().requires_grad_(True)
    col(xg).sum().backward()
    torch.testing.assert_close(xg.grad, src.to_dense().sum(0, keepdim=True) * (x.abs() > 0.3), rtol=1e-5, atol=1e-5)


def test_from_linear_with_int8_dtype_and_bf16_compute_refused():
    lin = _pruned_linear(32, 20, 0.5)
    col = ColumnSparseLinear.from_linear(lin, threshold=0.0, dtype=torch.int8)
    assert col.values.dtype == torch.int8 and col.scales.shape == (20,)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(col(x), torch.nn.functional.linear(x, col.weight_format.to_dense(), lin.bias),
                                   rtol=1e-5, atol=1e-4)
        # the int8 grid: within half a step of each row's scale of the float layer
        err = (col(x) - lin(x)).abs()
        assert bool((err <= 0.5 * col.scales * x.abs().sum(1, keepdim=True) + 1e-4).all())
    with pytest.raises(ConfigError, match="not int8"):
        col.set_compute_dtype(torch.bfloat16)


def _quantized_pruned_model():
    model = tiny_model("llama")
    sparseforge.sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.5), progress=False)
    quantize_(model, QuantConfig(bits=8))
    return model


def test_load_sparse_int8_checkpoint_with_thresholds_builds_int8_column_layers(tmp_path):
    model = _quantized_pruned_model()
    out = save_pretrained(model, tmp_path / "q", sparsity_config={"method": "magnitude", "sparsity": 0.5})
    loaded = load(out, sparse=True)
    sparse = {n: m for n, m in loaded.named_modules() if isinstance(m, SparseLinear)}
    assert sparse and all(m.weight_format.values.dtype == torch.int8 for m in sparse.values())
    thresholds = {n: 0.05 for n in sparse}
    path = tmp_path / FILE_NAME
    path.write_text(json.dumps({"version": FORMAT_VERSION, "layers": {n: {"kind": "linear", "threshold": t}
                                                                      for n, t in thresholds.items()}}))
    formats = {n: m.weight_format for n, m in sparse.items()}
    load_activation_sparsity_(loaded, path)  # the function load() applies a checkpoint's activation section with
    modules = dict(loaded.named_modules())
    for name, fmt in formats.items():
        layer = modules[name]
        assert isinstance(layer, ColumnSparseLinear), name
        assert layer.values.dtype == torch.int8 and torch.equal(layer.scales, fmt.scales), name
        assert layer.values.numel() == fmt.nnz  # 1 byte per kept weight, as in the row format
        assert torch.equal(layer.weight_format.to_dense(), fmt.to_dense()), name
    # the model computes the int8 pruned layers with masked inputs: compare with the same thresholds
    # applied to the SparseLinear model through dense torch
    ids = tokens(1, 8, seed=2)
    reference = load(out, sparse=True)
    hooks = [m.register_forward_pre_hook(lambda mod, args: (_masked(args[0], 0.05),))
             for n, m in reference.named_modules() if n in sparse]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    for h in hooks:
        h.remove()
