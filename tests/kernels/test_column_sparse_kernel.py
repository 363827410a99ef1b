"""Column-sparse linear kernel (csrc/column_sparse.h): activation x weight sparsity. Every ISA path
the CPU has, both algorithms (sparse GEMV, decoded-panel GEMM), against the scalar reference and
against dense torch on the masked input with the pruned weights zero."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from input_sparse_cases import ALGOS, DTYPES, at_thread_counts, random_problem, raw
from input_sparse_cases import tol as _tol

from sparseforge import kernels
from sparseforge.errors import ConfigError, DataError, ModelError
from sparseforge.formats.colbitmap import ColumnBitmapWeight
from sparseforge.kernels import native
from sparseforge.ops.column_sparse import column_sparse_linear, column_sparse_reference, kernel_args


def _ref(x, w: ColumnBitmapWeight, thr, bias=None):
    """The scalar oracle (native, plain loops over the bits)."""
    y = torch.empty(x.shape[0], w.shape[0])
    native().column_sparse_linear_ref(x.numpy(), w.bitmap.numpy(), w.block_ptr.numpy(), raw(w.values), thr.numpy(),
                                      None if bias is None else bias.numpy(), y.numpy())
    return y


def _case(batch, n_in, n_out, dtype, weight_sparsity=0.5, seed=0):
    x, w, bias = random_problem(batch, n_in, n_out, seed, weight_sparsity)  # w (out, in)
    return x, ColumnBitmapWeight.from_dense(w.to(dtype)), bias


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64, 256), (1, 300, 1000), (3, 129, 77), (7, 256, 1100), (13, 40, 16),
                                   (2, 17, 513)])
def test_kernel_matches_reference_and_dense(isa, algo, dtype, shape):
    batch, n_in, n_out = shape
    x, w, bias = _case(batch, n_in, n_out, dtype)
    thr = torch.tensor([0.6745])  # about half of N(0, 1) is skipped
    y = column_sparse_linear(x, w, thr, bias, algo=algo)
    torch.testing.assert_close(y, _ref(x, w, thr, bias), **_tol(n_in))
    torch.testing.assert_close(y, column_sparse_reference(x, w, thr, bias), **_tol(n_in))


@pytest.mark.parametrize("algo", ALGOS)
def test_per_channel_thresholds(isa, algo):
    x, w, _ = _case(4, 100, 48, torch.float32, seed=1)
    thr = torch.rand(100) * 1.5
    y = column_sparse_linear(x, w, thr, None, algo=algo)
    torch.testing.assert_close(y, column_sparse_reference(x, w, thr), **_tol(100))
    torch.testing.assert_close(y, _ref(x, w, thr), **_tol(100))


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_zero_is_the_pruned_dense_product(isa, algo, dtype):
    x, w, bias = _case(2, 96, 700, dtype, seed=2)
    x[:, ::5] = 0.0  # exact zeros are skipped, which changes nothing
    y = column_sparse_linear(x, w, torch.zeros(1), bias, algo=algo)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w.to_dense().float(), bias), **_tol(96))


@pytest.mark.parametrize("algo", ALGOS)
def test_threshold_inf_skips_everything(isa, algo):
    x, w, bias = _case(3, 64, 40, torch.float32, seed=3)
    y = column_sparse_linear(x, w, torch.tensor([math.inf]), bias, algo=algo)
    torch.testing.assert_close(y, bias.expand(3, 40))


@pytest.mark.parametrize("weight_sparsity", [0.0, 1.0])
def test_dense_and_empty_weights(isa, weight_sparsity):
    x, w, bias = _case(2, 33, 130, torch.float32, weight_sparsity=weight_sparsity, seed=9)
    assert w.nnz == (0 if weight_sparsity == 1.0 else 33 * 130)
    for algo in ALGOS:
        y = column_sparse_linear(x, w, torch.tensor([0.3]), bias, algo=algo)
        torch.testing.assert_close(y, column_sparse_reference(x, w, torch.tensor([0.3]), bias), **_tol(33))


@pytest.mark.parametrize("algo", ALGOS)
def test_nan_and_inf_inputs_propagate(isa, algo):
    x, w, _ = _case(2, 64, 32, torch.float32, seed=4)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    thr = torch.tensor([0.5])
    y = column_sparse_linear(x, w, thr, None, algo=algo)
    dense = column_sparse_reference(x, w, thr)
    assert torch.equal(torch.isnan(y), torch.isnan(dense)) and torch.equal(torch.isinf(y), torch.isinf(dense))


def test_thread_count_does_not_change_results():
    x, w, bias = _case(1, 512, 4096, torch.float32, seed=5)
    one, three = at_thread_counts(lambda: column_sparse_linear(x, w, torch.tensor([0.3]), bias))
    assert torch.equal(one, three)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1100, 600), (1, 700, 8300)])
def test_batch_one_adds_channel_parts_over_wide_tiles(isa, dtype, shape):
    """One row with >= 512 active channels: the GEMV cuts them into 2-4 parts whose partial sums are
    added in order (8300 outputs: two column tiles); the parts never depend on the thread count."""
    x, w, bias = _case(*shape, dtype, seed=7)
    thr = torch.zeros(1)  # every channel active
    y = column_sparse_linear(x, w, thr, bias, algo="gemv")
    torch.testing.assert_close(y, _ref(x, w, thr, bias), **_tol(shape[1]))
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w.to_dense().float(), bias), **_tol(shape[1]))
    one, three = at_thread_counts(lambda: column_sparse_linear(x, w, thr, bias, algo="gemv"))
    assert torch.equal(one, three) and torch.equal(one, y)


def test_degenerate_shapes(isa):
    w = ColumnBitmapWeight.from_dense(torch.randn(0, 8))
    assert column_sparse_linear(torch.randn(2, 8), w, torch.zeros(1)).shape == (2, 0)
    w = ColumnBitmapWeight.from_dense(torch.randn(5, 8))
    assert column_sparse_linear(torch.randn(0, 8), w, torch.zeros(1)).shape == (0, 5)
    w = ColumnBitmapWeight.from_dense(torch.randn(5, 0))
    assert torch.equal(column_sparse_linear(torch.randn(2, 0), w, torch.zeros(1), torch.ones(5)), torch.ones(2, 5))


def test_bad_inputs_are_clear_errors():
    x, w, _ = _case(1, 16, 8, torch.float32)
    with pytest.raises(DataError, match="threshold"):
        column_sparse_linear(x, w, torch.tensor([-1.0]))
    with pytest.raises(DataError, match="threshold"):
        column_sparse_linear(x, w, torch.tensor([math.nan]))
    with pytest.raises(DataError, match=r"shape \(batch, 16\)"):
        column_sparse_linear(torch.randn(1, 15), w, torch.zeros(1))
    with pytest.raises(ModelError, match="thresholds"):
        column_sparse_linear(x, w, torch.zeros(3))
    with pytest.raises(DataError, match="algo"):
        column_sparse_linear(x, w, torch.zeros(1), algo="fast")
    with pytest.raises(ModelError, match="ColumnBitmapWeight"):
        column_sparse_linear(x, torch.randn(8, 16), torch.zeros(1))


def test_inconsistent_buffers_are_refused_before_any_read():
    _, w, _ = _case(1, 16, 600, torch.float32)
    block_ptr = w.block_ptr.clone()
    block_ptr[1] += 1  # claims one more value in channel 0's first block than its bits hold
    with pytest.raises(ModelError, match="block_ptr"):
        kernel_args(w.bitmap, block_ptr, w.values, 600)
    bitmap = w.bitmap.clone()
    bitmap[0, -1] |= 1 << 62  # a bit past output 600
    with pytest.raises(ModelError, match="past output"):
        kernel_args(bitmap, w.block_ptr, w.values, 600)


def test_bad_isa_is_a_config_error(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", "fastest")
    x, w, _ = _case(1, 16, 8, torch.float32)
    with pytest.raises(ConfigError, match="fastest"):
        column_sparse_linear(x, w, torch.zeros(1))


def test_custom_op_fake_and_autograd():
    x, w, bias = _case(3, 24, 10, torch.float32, seed=7)
    thr = torch.tensor([0.5])
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    column_sparse_linear(xg, w, thr, bg).square().sum().backward()
    xr, br = x.clone().requires_grad_(), bias.clone().requires_grad_()
    keep = ~(xr.abs() <= thr)
    ((xr * keep) @ w.to_dense().t() + br).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bg.grad, br.grad, rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.sparseforge.column_sparse_linear.default,
                          (x, w.bitmap, w.block_ptr, w.values, thr, bias, 10))


def test_torch_compile_matches_eager():
    x, w, bias = _case(2, 32, 16, torch.float32, seed=8)
    thr = torch.tensor([0.4])
    fn = torch.compile(lambda a: column_sparse_linear(a, w, thr, bias) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x), column_sparse_linear(x, w, thr, bias) * 2)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 9),
    n_in=st.integers(1, 200),
    n_out=st.integers(1, 1100),
    weight_sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
    thr=st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5, math.inf]),
    bf16=st.booleans(),
    algo=st.sampled_from(["auto", "gemv", "gemm"]),
    isa=st.sampled_from([i for i in kernels.ISAS if kernels.cpu_supports(i)]),
    seed=st.integers(0, 2**16),
)
def test_property_kernel_equals_dense_on_masked_input(batch, n_in, n_out, weight_sparsity, thr, bf16, algo, isa, seed):
    x, w, bias = _case(batch, n_in, n_out, torch.bfloat16 if bf16 else torch.float32, weight_sparsity, seed)
    t = torch.tensor([thr])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEFORGE_ISA", isa)
        y = column_sparse_linear(x, w, t, bias, algo=algo)
    torch.testing.assert_close(y, column_sparse_reference(x, w, t, bias), **_tol(n_in))
    torch.testing.assert_close(y, _ref(x, w, t, bias), **_tol(n_in))
