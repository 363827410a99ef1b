"""Column-sparse linear kernel with int8 values (csrc/column_sparse.h): q widened in registers, the
x * q sums scaled per output row at the end of each tile. Every ISA path the CPU has, both
algorithms (sparse GEMV, decoded-panel GEMM), against the scalar reference and against dense torch
of the dequantized weight; the format's int8 round trips; the one-line errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from input_sparse_cases import ALGOS, at_thread_counts, random_problem
from input_sparse_cases import tol as _tol

from sparseforge.errors import ConfigError, DataError, ModelError
from sparseforge.formats import BitmapWeight, CSRWeight, NMWeight
from sparseforge.formats.colbitmap import ColumnBitmapWeight
from sparseforge.kernels import native
from sparseforge.ops.column_sparse import (column_sparse_linear, column_sparse_op, column_sparse_reference,
                                           dense_from_buffers, kernel_args)


def _ref(x, w: ColumnBitmapWeight, thr, bias=None):
    """The scalar oracle (native, plain loops over the bits, scale applied at the end)."""
    y = torch.empty(x.shape[0], w.shape[0])
    native().column_sparse_linear_ref(x.numpy(), w.bitmap.numpy(), w.block_ptr.numpy(), w.values.numpy(), thr.numpy(),
                                      None if bias is None else bias.numpy(), y.numpy(), w.scales.numpy())
    return y


def _case(batch, n_in, n_out, weight_sparsity=0.5, seed=0):
    x, w, bias = random_problem(batch, n_in, n_out, seed, weight_sparsity)  # w (out, in)
    return x, ColumnBitmapWeight.from_dense(w, values_dtype=torch.int8), bias


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("shape", [(1, 64, 256), (1, 300, 1000), (3, 129, 77), (7, 256, 1100), (13, 40, 16),
                                   (2, 17, 513), (1, 1, 1), (1, 33, 4097)])
def test_int8_kernel_matches_reference_and_dense(isa, algo, shape):
    batch, n_in, n_out = shape
    x, w, bias = _case(batch, n_in, n_out)
    assert w.values.dtype == torch.int8 and w.scales.shape == (n_out,)
    thr = torch.tensor([0.6745])  # about half of N(0, 1) is skipped
    y = column_sparse_linear(x, w, thr, bias, algo=algo)
    torch.testing.assert_close(y, _ref(x, w, thr, bias), **_tol(n_in))
    torch.testing.assert_close(y, column_sparse_reference(x, w, thr, bias), **_tol(n_in))


@pytest.mark.parametrize("shape", [(1, 1100, 600), (1, 700, 8300)])
def test_int8_batch_one_adds_channel_parts_then_scales(isa, shape):
    """One row, every channel active: the GEMV's channel parts add their unscaled sums, then the row
    scales and bias apply once (8300 outputs: two column tiles); the same at any thread count."""
    x, w, bias = _case(*shape, seed=8)
    thr = torch.zeros(1)
    y = column_sparse_linear(x, w, thr, bias, algo="gemv")
    torch.testing.assert_close(y, _ref(x, w, thr, bias), **_tol(shape[1]))
    one, three = at_thread_counts(lambda: column_sparse_linear(x, w, thr, bias, algo="gemv"))
    assert torch.equal(one, three) and torch.equal(one, y)


def test_int8_kernel_is_the_scaled_sum_of_q(isa):
    """The scalar oracle is y = scales * (x_masked @ q^T) + bias, with q the stored integers."""
    x, w, bias = _case(2, 50, 130, seed=4)
    q = dense_from_buffers(w.bitmap, w.values, 130)  # (out, in) float32 of the integers
    assert torch.equal(q, torch.round(q)) and float(q.abs().max()) == 127.0
    thr = torch.tensor([0.3])
    xm = torch.where(x.abs() <= thr, 0.0, x)
    want = (xm.double() @ q.double().t()) * w.scales.double() + bias.double()
    for algo in ALGOS:
        torch.testing.assert_close(column_sparse_linear(x, w, thr, bias, algo=algo).double(), want, **_tol(50))


@pytest.mark.parametrize("algo", ALGOS)
def test_int8_per_channel_thresholds_zero_and_inf(isa, algo):
    x, w, bias = _case(4, 100, 600, seed=1)
    x[:, ::7] = 0.0
    for thr in (torch.rand(100) * 1.5, torch.zeros(1)):
        y = column_sparse_linear(x, w, thr, bias, algo=algo)
        torch.testing.assert_close(y, column_sparse_reference(x, w, thr, bias), **_tol(100))
        torch.testing.assert_close(y, _ref(x, w, thr, bias), **_tol(100))
    dense = torch.nn.functional.linear(x, w.to_dense(), bias)  # threshold 0: the pruned dequantized layer
    torch.testing.assert_close(column_sparse_linear(x, w, torch.zeros(1), bias, algo=algo), dense, **_tol(100))
    y_inf = column_sparse_linear(x, w, torch.tensor([math.inf]), bias, algo=algo)
    torch.testing.assert_close(y_inf, bias.expand(4, 600))
    torch.testing.assert_close(column_sparse_linear(x, w, torch.tensor([math.inf]), None, algo=algo), torch.zeros(4, 600))


@pytest.mark.parametrize("algo", ALGOS)
def test_int8_nonfinite_inputs_propagate_as_dense(isa, algo):
    x, w, bias = _case(3, 70, 200, seed=5)
    x[0, 3], x[1, 10], x[2, 20] = math.nan, math.inf, -math.inf
    y = column_sparse_linear(x, w, torch.tensor([0.2]), bias, algo=algo)
    want = column_sparse_reference(x, w, torch.tensor([0.2]), bias)
    assert bool(torch.isnan(want).any())
    torch.testing.assert_close(y, want, equal_nan=True, **_tol(70))
    torch.testing.assert_close(y, _ref(x, w, torch.tensor([0.2]), bias), equal_nan=True, **_tol(70))


@pytest.mark.parametrize("weight_sparsity", [0.0, 1.0])
def test_int8_dense_and_empty_weights(isa, weight_sparsity):
    x, w, bias = _case(2, 33, 130, weight_sparsity=weight_sparsity, seed=9)
    assert w.nnz == (0 if weight_sparsity == 1.0 else 33 * 130)
    assert weight_sparsity < 1.0 or torch.equal(w.scales, torch.ones(130))  # all-pruned rows: scale 1
    for algo in ALGOS:
        y = column_sparse_linear(x, w, torch.tensor([0.3]), bias, algo=algo)
        torch.testing.assert_close(y, column_sparse_reference(x, w, torch.tensor([0.3]), bias), **_tol(33))


def test_int8_results_do_not_depend_on_the_thread_count(isa):
    x, w, bias = _case(1, 700, 5000, seed=6)
    for algo in ALGOS:
        a, b = at_thread_counts(lambda: column_sparse_linear(x, w, torch.tensor([0.1]), bias, algo=algo))
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 5), n_in=st.integers(1, 80), n_out=st.integers(1, 1100),
       sparsity=st.sampled_from([0.0, 0.5, 0.95]), thr=st.sampled_from([0.0, 0.5, math.inf]), seed=st.integers(0, 2**16))
def test_int8_property_every_path_equals_the_oracle(batch, n_in, n_out, sparsity, thr, seed):
    x, w, bias = _case(batch, n_in, n_out, sparsity, seed)
    t = torch.tensor([thr])
    want = _ref(x, w, t, bias)
    for algo in ALGOS:
        for isa in ("scalar", "avx2", "avx512"):
            from sparseforge import kernels
            if not kernels.cpu_supports(isa):
                continue
            y = torch.empty(batch, n_out)
            native().column_sparse_linear(x.numpy(), w.bitmap.numpy(), w.block_ptr.numpy(), w.values.numpy(), t.numpy(),
                                          bias.numpy(), y.numpy(), isa, algo, True, w.scales.numpy())
            torch.testing.assert_close(y, want, **_tol(n_in))


# ---- format: int8 values in the column layout ----------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 140), cols=st.integers(0, 40), sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       seed=st.integers(0, 2**16))
def test_int8_round_trip_matches_the_bitmap_format(rows, cols, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0.0
    col = ColumnBitmapWeight.from_dense(w, values_dtype=torch.int8)
    row = BitmapWeight.from_dense(w, values_dtype=torch.int8)
    assert col.values.dtype == torch.int8 and torch.equal(col.scales, row.scales)
    assert torch.equal(col.to_dense(), row.to_dense()) and torch.equal(col.mask(), row.mask())
    back = ColumnBitmapWeight.from_format(col)
    assert torch.equal(back.values, col.values) and torch.equal(back.scales, col.scales)
    assert col.nbytes == sum(t.numel() * t.element_size() for t in (col.bitmap, col.values, col.block_ptr, col.scales))


@pytest.mark.parametrize("fmt", ["bitmap", "nm", "csr"])
def test_from_int8_formats_keeps_q_and_scales(fmt):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 16, generator=g)
    w = w * (torch.rand(24, 16, generator=g) < 0.5) if fmt != "nm" else w
    if fmt == "bitmap":
        src = BitmapWeight.from_dense(w, values_dtype=torch.int8)
    elif fmt == "nm":
        keep = torch.zeros(24, 16, dtype=torch.bool)
        keep.view(24, 4, 4)[:, :, :2] = True
        src = NMWeight.from_dense(w * keep, "2:4", values_dtype=torch.int8)
    else:
        src = CSRWeight.from_dense(w, values_dtype=torch.int8)
    col = ColumnBitmapWeight.from_format(src)
    assert col.values.dtype == torch.int8 and torch.equal(col.scales, src.scales)
    assert torch.equal(col.to_dense(), src.to_dense())
    assert ColumnBitmapWeight.from_format(src, values_dtype=torch.float32).values.dtype == torch.float32


def test_given_scales_are_kept_and_checked():
    w = torch.tensor([[0.5, -1.0], [0.0, 0.25]])
    scales = torch.tensor([0.5, 0.25])
    col = ColumnBitmapWeight.from_dense(w, values_dtype=torch.int8, scales=scales)
    assert torch.equal(col.scales, scales) and col.values.tolist() == [1, -2, 1]
    with pytest.raises(ConfigError, match="grid"):
        ColumnBitmapWeight.from_dense(w, values_dtype=torch.int8, scales=torch.tensor([0.3, 0.25]))
    with pytest.raises(ConfigError, match="shape"):
        ColumnBitmapWeight.from_dense(w, values_dtype=torch.int8, scales=torch.ones(3))
    with pytest.raises(ConfigError, match="values_dtype=torch.int8"):
        ColumnBitmapWeight.from_dense(w, scales=scales)


@pytest.mark.parametrize("bad, match", [(torch.ones(3), "shape"), (torch.tensor([1.0, math.nan]), "finite"),
                                        (torch.tensor([1.0, 0.0]), "finite and > 0"),
                                        (torch.tensor([-1.0, 1.0]), "finite and > 0"), (None, "need float32 scales")])
def test_bad_scales_are_one_line_errors(bad, match):
    good = ColumnBitmapWeight.from_dense(torch.tensor([[0.5, -1.0], [0.0, 0.25]]), values_dtype=torch.int8)
    with pytest.raises(ModelError, match=match) as err:
        ColumnBitmapWeight(good.shape, good.bitmap, good.values, bad)
    assert "\n" not in str(err.value)
    # the native check rejects the same buffers (a module's scales changed after construction)
    if bad is not None and bad.shape == (2,):
        with pytest.raises(ModelError, match="finite and > 0") as err:
            kernel_args(good.bitmap, good.block_ptr, good.values, 2, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="scales"):
        column_sparse_op(torch.randn(1, 2), good.bitmap, good.block_ptr, good.values, torch.zeros(1), None, 2,
                         None if bad is None else bad.reshape(-1)[:1])


def test_int8_values_refuse_bf16_compute_and_float_scales_mismatch():
    x, w, bias = _case(20, 16, 32)
    with pytest.raises(ConfigError, match="not int8"):
        column_sparse_linear(x, w, torch.zeros(1), bias, compute_dtype=torch.bfloat16)
    fw = ColumnBitmapWeight.from_dense(w.to_dense())
    with pytest.raises(ModelError, match="only int8 values take scales"):
        column_sparse_op(x, fw.bitmap, fw.block_ptr, fw.values, torch.zeros(1), None, 32, w.scales)
    with pytest.raises((ModelError, DataError), match="scales"):
        native().column_sparse_linear_bf16(x.numpy(), w.bitmap.numpy(), w.block_ptr.numpy(), w.values.numpy(),
                                           torch.zeros(1).numpy(), None, torch.empty(20, 32).numpy())


def test_int8_op_autograd_and_fake():
    x, w, bias = _case(3, 24, 40, seed=7)
    x.requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    thr = torch.tensor([0.4])
    y = column_sparse_op(x, w.bitmap, w.block_ptr, w.values, thr, b, 40, w.scales)
    dy = torch.randn(3, 40)
    y.backward(dy)
    xr = x.detach().clone().requires_grad_(True)
    br = bias.clone().requires_grad_(True)
    yr = torch.nn.functional.linear(torch.where(xr.abs() <= thr, 0.0, xr), w.to_dense(), br)
    yr.backward(dy)
    torch.testing.assert_close(y, yr, **_tol(24))
    torch.testing.assert_close(x.grad, xr.grad, **_tol(40))
    torch.testing.assert_close(b.grad, br.grad)
    torch.library.opcheck(torch.ops.sparseforge.column_sparse_linear,
                          (x.detach(), w.bitmap, w.block_ptr, w.values, thr, bias, 40, w.scales))
