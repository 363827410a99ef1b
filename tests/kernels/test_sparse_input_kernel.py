"""Sparse-input linear kernel (csrc/sparse_input.h): every ISA path the CPU has, both algorithms
(sparse GEMV, masked GEMM), against the scalar reference and against dense torch on the masked input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from input_sparse_cases import ALGOS, DTYPES, at_thread_counts, random_problem, raw
from input_sparse_cases import tol as _tol

from sparseforge.errors import ConfigError, DataError, ModelError
from sparseforge.kernels import native
from sparseforge.ops.sparse_input import active_counts, sparse_input_linear, sparse_input_reference

# ALGOS: the native paths; "torch" (and "auto") are covered by the property test


def _ref(x, w_t, thr, bias=None):
    """The scalar oracle (native, plain loops)."""
    y = torch.empty(x.shape[0], w_t.shape[1])
    native().sparse_input_linear_ref(x.numpy(), raw(w_t), thr.numpy(), None if bias is None else bias.numpy(), y.numpy())
    return y


def _case(batch, n_in, n_out, dtype, seed=0):
    x, w, bias = random_problem(batch, n_in, n_out, seed)
    return x, w.t().contiguous().to(dtype), bias  # w_t (in, out)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64, 256), (1, 300, 1000), (3, 129, 77), (7, 256, 512), (13, 40, 16)])
def test_kernel_matches_reference_and_dense(isa, algo, dtype, shape):
    batch, n_in, n_out = shape
    x, w_t, bias = _case(batch, n_in, n_out, dtype)
    thr = torch.tensor([0.6745])  # about half of N(0, 1) is skipped
    y = sparse_input_linear(x, w_t, thr, bias, algo=algo)
    torch.testing.assert_close(y, _ref(x, w_t, thr, bias), **_tol(n_in))
    torch.testing.assert_close(y, sparse_input_reference(x, w_t, thr, bias), **_tol(n_in))


@pytest.mark.parametrize("algo", ALGOS)
def test_per_channel_thresholds(isa, algo):
    x, w_t, _ = _case(4, 100, 48, torch.float32, seed=1)
    thr = torch.rand(100) * 1.5
    y = sparse_input_linear(x, w_t, thr, None, algo=algo)
    torch.testing.assert_close(y, sparse_input_reference(x, w_t, thr), **_tol(100))
    torch.testing.assert_close(y, _ref(x, w_t, thr), **_tol(100))


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_zero_is_the_dense_product(isa, algo, dtype):
    x, w_t, bias = _case(2, 96, 80, dtype, seed=2)
    x[:, ::5] = 0.0  # exact zeros are skipped, which changes nothing
    y = sparse_input_linear(x, w_t, torch.zeros(1), bias, algo=algo)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w_t.float().t(), bias), **_tol(96))


@pytest.mark.parametrize("algo", ALGOS)
def test_threshold_inf_skips_everything(isa, algo):
    x, w_t, bias = _case(3, 64, 40, torch.float32, seed=3)
    if algo == "gemv":
        w_t[5] = float("nan")  # the GEMV never reads a skipped channel's weights: NaN there changes nothing
    y = sparse_input_linear(x, w_t, torch.tensor([math.inf]), bias, algo=algo)
    torch.testing.assert_close(y, bias.expand(3, 40))
    assert (active_counts(x, torch.tensor([math.inf])) == 0).all()


@pytest.mark.parametrize("algo", ALGOS)
def test_nan_and_inf_inputs_propagate(isa, algo):
    x, w_t, _ = _case(2, 64, 32, torch.float32, seed=4)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    thr = torch.tensor([0.5])
    y = sparse_input_linear(x, w_t, thr, None, algo=algo)
    dense = sparse_input_reference(x, w_t, thr)
    assert torch.isnan(y[0]).all()  # NaN is never skipped
    assert torch.equal(torch.isnan(y), torch.isnan(dense)) and torch.equal(torch.isinf(y), torch.isinf(dense))


def test_thread_count_does_not_change_results():
    x, w_t, bias = _case(1, 512, 4096, torch.float32, seed=5)
    one, three = at_thread_counts(lambda: sparse_input_linear(x, w_t, torch.tensor([0.3]), bias))
    assert torch.equal(one, three)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1100, 600), (1, 700, 8300)])
def test_batch_one_adds_channel_parts_over_wide_tiles(isa, dtype, shape):
    """One row with >= 512 active channels: the GEMV cuts them into 2-4 parts whose partial sums are
    added in order (8300 outputs: two column tiles); the parts never depend on the thread count."""
    x, w_t, bias = _case(*shape, dtype, seed=7)
    thr = torch.zeros(1)  # every channel active
    y = sparse_input_linear(x, w_t, thr, bias, algo="gemv")
    torch.testing.assert_close(y, _ref(x, w_t, thr, bias), **_tol(shape[1]))
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w_t.float().t(), bias), **_tol(shape[1]))
    one, three = at_thread_counts(lambda: sparse_input_linear(x, w_t, thr, bias, algo="gemv"))
    assert torch.equal(one, three) and torch.equal(one, y)


def test_active_counts_match_torch():
    x, _, _ = _case(5, 333, 1, torch.float32, seed=6)
    thr = torch.tensor([0.8])
    assert torch.equal(active_counts(x, thr), (~(x.abs() <= thr)).sum(1))


def test_degenerate_shapes(isa):
    w_t = torch.randn(8, 0)
    assert sparse_input_linear(torch.randn(2, 8), w_t, torch.zeros(1)).shape == (2, 0)
    y = sparse_input_linear(torch.randn(0, 8), torch.randn(8, 5), torch.zeros(1))
    assert y.shape == (0, 5)
    y = sparse_input_linear(torch.randn(2, 0), torch.randn(0, 5), torch.zeros(1), torch.ones(5))
    assert torch.equal(y, torch.ones(2, 5))


def test_bad_inputs_are_clear_errors():
    x, w_t, _ = _case(1, 16, 8, torch.float32)
    with pytest.raises(DataError, match="threshold"):
        sparse_input_linear(x, w_t, torch.tensor([-1.0]))
    with pytest.raises(DataError, match="threshold"):
        sparse_input_linear(x, w_t, torch.tensor([math.nan]))
    with pytest.raises(DataError, match=r"shape \(batch, 16\)"):
        sparse_input_linear(torch.randn(1, 15), w_t, torch.zeros(1))
    with pytest.raises(ModelError, match="contiguous"):
        sparse_input_linear(x, torch.randn(8, 16).t(), torch.zeros(1))
    with pytest.raises(ModelError, match="thresholds"):
        sparse_input_linear(x, w_t, torch.zeros(3))
    with pytest.raises(DataError, match="algo"):
        sparse_input_linear(x, w_t, torch.zeros(1), algo="fast")


def test_bad_isa_is_a_config_error(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", "fastest")
    x, w_t, _ = _case(1, 16, 8, torch.float32)
    with pytest.raises(ConfigError, match="fastest"):
        sparse_input_linear(x, w_t, torch.zeros(1))


def test_custom_op_fake_and_autograd():
    x, w_t, bias = _case(3, 24, 10, torch.float32, seed=7)
    thr = torch.tensor([0.5])
    xg, wg, bg = x.clone().requires_grad_(), w_t.clone().requires_grad_(), bias.clone().requires_grad_()
    sparse_input_linear(xg, wg, thr, bg).square().sum().backward()
    xr, wr, br = x.clone().requires_grad_(), w_t.clone().requires_grad_(), bias.clone().requires_grad_()
    keep = ~(xr.abs() <= thr)
    ((xr * keep) @ wr + br).square().sum().backward()
    for a, b in ((xg, xr), (wg, wr), (bg, br)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.sparseforge.sparse_input_linear.default, (x, w_t, thr, bias))


def test_torch_compile_matches_eager():
    x, w_t, bias = _case(2, 32, 16, torch.float32, seed=8)
    thr = torch.tensor([0.4])
    fn = torch.compile(lambda a: sparse_input_linear(a, w_t, thr, bias) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x), sparse_input_linear(x, w_t, thr, bias) * 2)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 9),
    n_in=st.integers(1, 200),
    n_out=st.integers(1, 300),
    thr=st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5, math.inf]),
    bf16=st.booleans(),
    algo=st.sampled_from(["auto", "gemv", "gemm", "torch"]),
    seed=st.integers(0, 2**16),
)
def test_property_kernel_equals_dense_on_masked_input(batch, n_in, n_out, thr, bf16, algo, seed):
    x, w_t, bias = _case(batch, n_in, n_out, torch.bfloat16 if bf16 else torch.float32, seed)
    t = torch.tensor([thr])
    y = sparse_input_linear(x, w_t, t, bias, algo=algo)
    # the torch path rounds the input to the weight's dtype (bfloat16 like a dense bf16 layer)
    tol = dict(rtol=2e-2, atol=2e-2 * math.sqrt(n_in)) if bf16 and algo in ("auto", "torch") else _tol(n_in)
    torch.testing.assert_close(y, sparse_input_reference(x, w_t, t, bias), **tol)
    torch.testing.assert_close(y, _ref(x, w_t, t, bias), **tol)
    # the skipped fraction is what the threshold says
    assert torch.equal(active_counts(x, t), (x.abs() > thr).sum(1))


@settings(max_examples=20, deadline=None)
@given(n_in=st.integers(1, 300), s=st.floats(0.0, 0.95), seed=st.integers(0, 2**16))
def test_property_result_only_depends_on_active_channels(n_in, s, seed):
    """Changing the weights of skipped channels never changes the output (they are never read)."""
    x, w_t, _ = _case(1, n_in, 33, torch.float32, seed)
    t = torch.tensor([float(np.quantile(x.abs().numpy(), s))])
    skipped = (x.abs() <= t)[0]
    w2 = w_t.clone()
    w2[skipped] = torch.randn(int(skipped.sum()), 33)
    assert torch.equal(sparse_input_linear(x, w_t, t), sparse_input_linear(x, w2, t))


def test_binding_checks_shapes():
    x, w_t, _ = _case(2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match=r"\(16, 7\)"):
        native().sparse_input_linear(x.numpy(), w_t.numpy(), np.zeros(1, np.float32), None, np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="thresholds"):
        native().sparse_input_linear(x.numpy(), w_t.numpy(), np.zeros(3, np.float32), None, np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="counts"):
        native().sparse_input_count(x.numpy(), np.zeros(1, np.float32), np.zeros(3, np.int64))
