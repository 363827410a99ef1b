"""bf16 compute of the column-sparse layer (csrc/column_sparse_bf16.h): every bf16 path this machine
runs (AMX, avx512_bf16, scalar) against the scalar oracle (the reference loops on bf16-rounded kept
inputs and weights) and against dense torch on the same rounded operands; odd shapes, thresholds 0
and +inf, NaN / inf inputs, channels inactive in every row (skipped K), thread invariance, the
registered op and the dispatch by batch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from input_sparse_cases import at_thread_counts, random_problem, raw

from sparseforge import kernels
from sparseforge.errors import ConfigError
from sparseforge.formats.colbitmap import ColumnBitmapWeight
from sparseforge.kernels import native
from sparseforge.ops.bf16_compute import BF16_MIN_BATCH
from sparseforge.ops.column_sparse import (column_sparse_bf16_op, column_sparse_bf16_reference, column_sparse_linear,
                                           column_sparse_reference, uses_bf16_product)

PATHS = tuple(p for p in kernels.BF16_PATHS if kernels.bf16_path_supported(p))


def _views(w: ColumnBitmapWeight):
    return w.bitmap.numpy(), w.block_ptr.numpy(), raw(w.values)


def _kernel(x, w, thr, bias=None, path="scalar"):
    y = torch.full((x.shape[0], w.shape[0]), float("nan"))
    native().column_sparse_linear_bf16(x.numpy(), *_views(w), thr.numpy(), None if bias is None else bias.numpy(),
                                       y.numpy(), path)
    return y


def _oracle(x, w, thr, bias=None):
    y = torch.empty(x.shape[0], w.shape[0])
    native().column_sparse_linear_bf16_ref(x.numpy(), *_views(w), thr.numpy(), None if bias is None else bias.numpy(),
                                           y.numpy())
    return y


def _case(batch, n_in, n_out, dtype, weight_sparsity=0.5, seed=0):
    x, w, bias = random_problem(batch, n_in, n_out, seed, weight_sparsity)  # w (out, in)
    return x, ColumnBitmapWeight.from_dense(w.to(dtype)), bias


def _tol(n_in):  # bf16 products are exact in float32: only the summation order differs
    return dict(rtol=1e-4, atol=2e-5 * math.sqrt(max(n_in, 1)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 300, 1000), (17, 129, 77), (3, 33, 513), (1, 1, 1), (40, 64, 32),
                                   (70, 257, 600), (16, 1000, 40)])
def test_paths_match_the_oracle_and_dense_torch(path, dtype, shape):
    batch, n_in, n_out = shape
    x, w, bias = _case(batch, n_in, n_out, dtype)
    thr = torch.tensor([0.6745])  # about half of N(0, 1) is skipped
    y = _kernel(x, w, thr, bias, path)
    torch.testing.assert_close(y, _oracle(x, w, thr, bias), **_tol(n_in))
    torch.testing.assert_close(y, column_sparse_bf16_reference(x, w, thr, bias), **_tol(n_in))


def test_oracle_rounds_the_kept_inputs_and_the_weights_to_bf16():
    x, w, bias = _case(5, 70, 90, torch.float32, seed=11)
    thr = torch.tensor([0.3])
    want = column_sparse_reference(x, w, thr, bias)  # float32 operands
    got = _oracle(x, w, thr, bias)
    assert not torch.allclose(got, want, rtol=0, atol=1e-6)  # the rounding shows ...
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)  # ... within bf16 precision
    torch.testing.assert_close(got, column_sparse_bf16_reference(x, w, thr, bias), **_tol(70))


@pytest.mark.parametrize("path", PATHS)
def test_per_channel_thresholds_and_channels_inactive_in_every_row(path):
    x, w, bias = _case(48, 200, 300, torch.bfloat16, seed=1)
    thr = torch.rand(200) * 1.5
    thr[::3] = math.inf  # a third of the channels skipped in every row: never read
    x[:, 1::7] = 0.0
    y = _kernel(x, w, thr, bias, path)
    torch.testing.assert_close(y, _oracle(x, w, thr, bias), **_tol(200))
    # the skipped channels' weights do not matter: poison them
    dense = w.to_dense().float()
    dense[:, ::3] = torch.where(dense[:, ::3] != 0, torch.tensor(float("nan")), dense[:, ::3])
    poisoned = ColumnBitmapWeight.from_dense(dense.bfloat16())
    assert torch.equal(_kernel(x, poisoned, thr, bias, path), y)


@pytest.mark.parametrize("path", PATHS)
def test_threshold_zero_is_the_dense_bf16_product(path):
    x, w, bias = _case(33, 96, 700, torch.bfloat16, seed=2)
    x[:, ::5] = 0.0
    y = _kernel(x, w, torch.zeros(1), bias, path)
    dense = torch.nn.functional.linear(x.bfloat16().float(), w.to_dense().float(), bias)
    torch.testing.assert_close(y, dense, **_tol(96))


@pytest.mark.parametrize("path", PATHS)
def test_threshold_inf_leaves_the_bias(path):
    x, w, bias = _case(20, 64, 40, torch.bfloat16, seed=3)
    assert torch.equal(_kernel(x, w, torch.tensor([math.inf]), bias, path), bias.expand(20, 40))
    assert torch.equal(_kernel(x, w, torch.tensor([math.inf]), None, path), torch.zeros(20, 40))


@pytest.mark.parametrize("path", PATHS)
def test_nan_and_inf_inputs_propagate_as_in_the_oracle(path):
    x, w, _ = _case(24, 64, 96, torch.bfloat16, seed=4)
    x[0, 3] = float("nan")
    x[5, 7] = float("inf")
    x[9, 8] = float("-inf")
    x[11, :] = float("inf")  # |inf| <= inf: every channel skipped by the +inf threshold below
    for thr in (torch.tensor([0.5]), torch.zeros(1)):
        y, ref = _kernel(x, w, thr, None, path), _oracle(x, w, thr)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
        finite = torch.isfinite(ref)
        torch.testing.assert_close(y[finite], ref[finite], **_tol(64))
    y = _kernel(x, w, torch.tensor([math.inf]), None, path)
    assert torch.isnan(y[0]).all() and torch.equal(y[1:], torch.zeros(23, 96))  # NaN is never skipped


@pytest.mark.parametrize("path", PATHS)
def test_thread_count_does_not_change_results(path):
    x, w, bias = _case(64, 512, 2100, torch.bfloat16, seed=5)
    thr = torch.tensor([0.3])
    one, three = at_thread_counts(lambda: _kernel(x, w, thr, bias, path))
    assert torch.equal(one, three)


@pytest.mark.parametrize("weight_sparsity", [0.0, 1.0])
def test_dense_and_empty_weights(weight_sparsity):
    x, w, bias = _case(20, 33, 130, torch.bfloat16, weight_sparsity=weight_sparsity, seed=9)
    for path in PATHS:
        torch.testing.assert_close(_kernel(x, w, torch.tensor([0.3]), bias, path), _oracle(x, w, torch.tensor([0.3]), bias),
                                   **_tol(33))


def test_degenerate_shapes():
    for path in PATHS:
        w = ColumnBitmapWeight.from_dense(torch.randn(5, 0))
        assert torch.equal(_kernel(torch.randn(20, 0), w, torch.zeros(1), torch.ones(5), path), torch.ones(20, 5))
        w = ColumnBitmapWeight.from_dense(torch.randn(5, 8))
        assert _kernel(torch.randn(0, 8), w, torch.zeros(1), None, path).shape == (0, 5)


def test_unknown_or_unavailable_path_is_a_config_error(monkeypatch):
    x, w, _ = _case(20, 16, 8, torch.bfloat16)
    with pytest.raises(ConfigError, match="not a bf16 kernel path"):
        _kernel(x, w, torch.zeros(1), None, "fast")
    monkeypatch.setenv("SPARSEFORGE_BF16_PATH", "turbo")
    with pytest.raises(ConfigError, match="SPARSEFORGE_BF16_PATH"):
        column_sparse_linear(x, w, torch.zeros(1), compute_dtype=torch.bfloat16)


def test_environment_forces_the_path(monkeypatch):
    x, w, bias = _case(32, 100, 200, torch.bfloat16, seed=6)
    thr = torch.tensor([0.5])
    outs = {}
    for path in PATHS:
        monkeypatch.setenv("SPARSEFORGE_BF16_PATH", path)
        outs[path] = column_sparse_linear(x, w, thr, bias, compute_dtype=torch.bfloat16)
        torch.testing.assert_close(outs[path], _oracle(x, w, thr, bias), **_tol(100))
    assert torch.equal(outs["scalar"], _kernel(x, w, thr, bias, "scalar"))


def test_dispatch_by_batch_and_compute_dtype():
    assert uses_bf16_product(BF16_MIN_BATCH, torch.bfloat16)
    assert not uses_bf16_product(BF16_MIN_BATCH - 1, torch.bfloat16)
    assert uses_bf16_product(1, torch.bfloat16, "gemm") and not uses_bf16_product(64, torch.bfloat16, "gemv")
    assert not uses_bf16_product(64, torch.float32)
    x, w, bias = _case(BF16_MIN_BATCH, 80, 50, torch.bfloat16, seed=7)
    thr = torch.tensor([0.4])
    big = column_sparse_linear(x, w, thr, bias, compute_dtype=torch.bfloat16)
    torch.testing.assert_close(big, _oracle(x, w, thr, bias), **_tol(80))
    small = column_sparse_linear(x[:2], w, thr, bias, compute_dtype=torch.bfloat16)  # float32 kernel on float32 x
    torch.testing.assert_close(small, column_sparse_reference(x[:2], w, thr, bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="compute_dtype"):
        column_sparse_linear(x, w, thr, compute_dtype=torch.float16)


def test_registered_op_fake_autograd_and_compile():
    x, w, bias = _case(20, 48, 36, torch.bfloat16, seed=8)
    thr = torch.tensor([0.5])
    args = (w.bitmap, w.block_ptr, w.values, thr)
    torch.library.opcheck(torch.ops.sparseforge.column_sparse_linear_bf16.default, (x, *args, bias, 36))
    xg = x.clone().requires_grad_(True)
    y = column_sparse_bf16_op(xg, *args, bias, 36)
    y.sum().backward()
    kept = ~(x.abs() <= thr)
    torch.testing.assert_close(xg.grad, (torch.ones(20, 36) @ w.to_dense().float()) * kept)
    compiled = torch.compile(lambda x: column_sparse_bf16_op(x, *args, bias, 36), fullgraph=True)
    torch.testing.assert_close(compiled(x), _oracle(x, w, thr, bias), **_tol(48))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 80), n_in=st.integers(1, 140), n_out=st.integers(1, 600),
       weight_sparsity=st.sampled_from([0.0, 0.5, 0.9]), thr=st.sampled_from([0.0, 0.3, 1.0, math.inf]),
       values_bf16=st.booleans(), path=st.sampled_from(PATHS), seed=st.integers(0, 2**16))
def test_property_every_path_equals_the_oracle(batch, n_in, n_out, weight_sparsity, thr, values_bf16, path, seed):
    x, w, bias = _case(batch, n_in, n_out, torch.bfloat16 if values_bf16 else torch.float32, weight_sparsity, seed)
    t = torch.tensor([thr])
    torch.testing.assert_close(_kernel(x, w, t, bias, path), _oracle(x, w, t, bias), **_tol(n_in))


def test_module_runs_the_bf16_product_from_16_rows():
    import copy

    from sparseforge.activation import ColumnSparseLinear

    x, w, bias = _case(40, 72, 50, torch.bfloat16, seed=12)
    thr = torch.tensor([0.5])
    layer = ColumnSparseLinear(w, bias, threshold=0.5, compute_dtype=torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and "compute_dtype=bfloat16" in repr(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _oracle(x, w, thr, bias), **_tol(72))
        few = x[:BF16_MIN_BATCH - 1]
        torch.testing.assert_close(layer(few), column_sparse_reference(few, w, thr, bias), rtol=1e-5, atol=1e-5)
        assert torch.equal(copy.deepcopy(layer)(x), layer(x))
        assert not torch.allclose(layer.set_compute_dtype(torch.float32)(x), _oracle(x, w, thr, bias), rtol=0, atol=1e-6)
    layer.set_compute_dtype(torch.bfloat16)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)  # the registered op under autograd
    torch.testing.assert_close(y.detach(), _oracle(x, w, thr, bias), **_tol(72))
    y.sum().backward()
    assert xg.grad is not None and torch.equal(xg.grad[x.abs() <= 0.5], torch.zeros(int((x.abs() <= 0.5).sum())))
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), _oracle(x, w, thr, bias), **_tol(72))
    with pytest.raises(ConfigError, match="compute_dtype"):
        layer.set_compute_dtype(torch.float16)
