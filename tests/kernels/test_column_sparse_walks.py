"""Every batch-1 walk of the column-sparse GEMV (csrc/column_sparse_kernels.h) against the scalar
reference and dense torch: scalar, AVX2, AVX-512 (float32: eight channels per group; bfloat16:
widening + vexpandps) and AVX-512 with VBMI2 (bfloat16: vpexpandw over 32 outputs, partial sums kept
as even / odd outputs inside the tile). SPARSEFORGE_VBMI2=0 forces the plain AVX-512 walk on a CPU
that has VBMI2; the rest of the suite runs whichever the CPU picks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from input_sparse_cases import at_thread_counts, random_problem, raw, tol

from sparseforge import kernels
from sparseforge.errors import DataError
from sparseforge.formats.colbitmap import ColumnBitmapWeight
from sparseforge.kernels import native
from sparseforge.ops.column_sparse import column_sparse_linear

# (walk, SPARSEFORGE_ISA, SPARSEFORGE_VBMI2)
WALKS = {"scalar": ("scalar", "0"), "avx2": ("avx2", "0"), "avx512": ("avx512", "0"),
         "avx512_vbmi2": ("avx512", "1")}


def _has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        return flag in f.read().split()


def _runnable(walk: str) -> bool:
    isa, _ = WALKS[walk]
    return kernels.cpu_supports(isa) and (walk != "avx512_vbmi2" or _has("avx512_vbmi2"))


WALK_PARAMS = [pytest.param(w, marks=pytest.mark.skipif(not _runnable(w), reason=f"CPU lacks {w}")) for w in WALKS]
VALUE_DTYPES = [torch.float32, torch.bfloat16, torch.int8]


@pytest.fixture(params=WALK_PARAMS)
def walk(request, monkeypatch):
    isa, vbmi2 = WALKS[request.param]
    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    monkeypatch.setenv("SPARSEFORGE_VBMI2", vbmi2)
    assert native().column_sparse_walk("") == request.param
    return request.param


def _weight(w: torch.Tensor, dtype: torch.dtype) -> ColumnBitmapWeight:
    if dtype == torch.int8:
        return ColumnBitmapWeight.from_dense(w, w != 0, values_dtype=torch.int8)
    return ColumnBitmapWeight.from_dense(w.to(dtype), w != 0)


def _ref(x, w: ColumnBitmapWeight, thr, bias):
    """The scalar oracle (native, plain loops over the bits)."""
    y = torch.empty(x.shape[0], w.shape[0])
    native().column_sparse_linear_ref(x.numpy(), w.bitmap.numpy(), w.block_ptr.numpy(), raw(w.values), thr.numpy(),
                                      bias.numpy(), y.numpy(), None if w.scales is None else w.scales.numpy())
    return y


def _check(x, w, thr, bias, n_in):
    y = column_sparse_linear(x, w, thr, bias, algo="gemv")
    torch.testing.assert_close(y, _ref(x, w, thr, bias), **tol(n_in))
    kept = torch.where(x.abs() <= thr, 0.0, x)
    torch.testing.assert_close(y, torch.nn.functional.linear(kept, w.to_dense().float(), bias), **tol(n_in))
    return y


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("n_out", [1, 16, 31, 33, 64, 95, 513, 1100])  # tails of 16, 32 and 64 outputs
@pytest.mark.parametrize("n_in", [1, 3, 4, 7, 8, 9, 13, 21])  # groups of 8, 4 and single channels
def test_walk_matches_reference_and_dense(walk, dtype, n_out, n_in):
    x, w, bias = random_problem(1, n_in, n_out, seed=n_in * 1000 + n_out, weight_sparsity=0.5)
    _check(x, _weight(w, dtype), torch.zeros(1), bias, n_in)


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1100, 600), (1, 700, 8300), (3, 300, 1000), (5, 40, 77)])
def test_wide_tiles_parts_and_several_rows(walk, dtype, shape):
    """Batch 1 with 2-4 channel parts over one and two column tiles; several rows (each row's GEMV
    starts its tile at the bias, which the VBMI2 walk reorders into even / odd outputs and back)."""
    batch, n_in, n_out = shape
    x, w, bias = random_problem(batch, n_in, n_out, seed=n_out, weight_sparsity=0.5)
    y = _check(x, _weight(w, dtype), torch.tensor([0.3]), bias, n_in)
    one, three = at_thread_counts(lambda: column_sparse_linear(x, _weight(w, dtype), torch.tensor([0.3]), bias,
                                                               algo="gemv"))
    assert torch.equal(one, three) and torch.equal(one, y)


@pytest.mark.parametrize("shape", [(1, 19, 8192), (1, 19, 8193), (2, 11, 4097), (3, 9, 8191)])
def test_staged_bitmap_rows_at_the_widest_tiles(walk, shape):
    """The AVX-512 walks copy each group's bitmap rows over the tile into a stage of at most 8192
    columns (batch 1) or 4096 (several rows): tiles of exactly that width, one column more (a second
    tile of one column), and scattered active channels (per-channel thresholds skip every third), so
    the staged rows come from channels far apart; at 1 and 3 threads."""
    batch, n_in, n_out = shape
    x, w, bias = random_problem(batch, n_in, n_out, seed=n_out + n_in, weight_sparsity=0.5)
    thr = torch.tensor([math.inf if i % 3 == 1 else 0.0 for i in range(n_in)])
    for dtype in VALUE_DTYPES:
        cw = _weight(w, dtype)
        y = _check(x, cw, thr, bias, n_in)
        one, three = at_thread_counts(lambda: column_sparse_linear(x, cw, thr, bias, algo="gemv"))
        assert torch.equal(one, three) and torch.equal(one, y)


@pytest.mark.parametrize("weight_sparsity", [0.0, 0.9, 1.0])
def test_dense_very_sparse_and_empty_channels(walk, weight_sparsity):
    """Whole 32-output chunks stored (every bit set), almost none, and none (a channel with no values
    reads nothing: its value pointer may sit at the end of the buffer)."""
    x, w, bias = random_problem(1, 45, 200, seed=3, weight_sparsity=weight_sparsity)
    for dtype in VALUE_DTYPES[:2]:
        _check(x, _weight(w, dtype), torch.zeros(1), bias, 45)


def test_nan_and_inf_weights_and_inputs_propagate(walk):
    x, w, bias = random_problem(1, 24, 100, seed=4, weight_sparsity=0.5)
    w[7, 3] = math.inf  # stored (nonzero), channel 3 active
    x[0, 5] = math.nan
    for dtype in VALUE_DTYPES[:2]:
        cw = _weight(w, dtype)
        y = column_sparse_linear(x, cw, torch.zeros(1), bias, algo="gemv")
        ref = _ref(x, cw, torch.zeros(1), bias)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
        assert torch.isnan(y).all()  # the NaN input reaches every output its channel stores or not (0 * NaN)


def test_vbmi2_walk_equals_the_plain_avx512_walk(monkeypatch):
    """The two AVX-512 bfloat16 walks add the same products in the same order per output: equal bits."""
    if not _runnable("avx512_vbmi2"):
        pytest.skip("CPU lacks avx512_vbmi2")
    x, w, bias = random_problem(1, 333, 1500, seed=5, weight_sparsity=0.5)
    cw = _weight(w, torch.bfloat16)
    monkeypatch.setenv("SPARSEFORGE_ISA", "avx512")
    ys = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("SPARSEFORGE_VBMI2", setting)
        ys[setting] = column_sparse_linear(x, cw, torch.tensor([0.2]), bias, algo="gemv")
    assert torch.equal(ys["0"], ys["1"])


def test_bad_vbmi2_setting_is_a_clear_error(monkeypatch):
    if not kernels.cpu_supports("avx512"):
        pytest.skip("CPU lacks avx512")
    x, w, _ = random_problem(1, 8, 16, weight_sparsity=0.5)
    monkeypatch.setenv("SPARSEFORGE_ISA", "avx512")
    monkeypatch.setenv("SPARSEFORGE_VBMI2", "yes")
    with pytest.raises((DataError, ValueError), match="SPARSEFORGE_VBMI2='yes'.*auto, 0 or 1"):
        column_sparse_linear(x, _weight(w, torch.bfloat16), torch.zeros(1))


@settings(max_examples=60, deadline=None)
@given(walk=st.sampled_from([w for w in WALKS if _runnable(w)]), n_in=st.integers(1, 40), n_out=st.integers(1, 700),
       weight_sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]), thr=st.sampled_from([0.0, 0.5, 1.5, math.inf]),
       dtype=st.sampled_from(VALUE_DTYPES), seed=st.integers(0, 2**16))
def test_property_every_walk_equals_the_oracle(walk, n_in, n_out, weight_sparsity, thr, dtype, seed):
    x, w, bias = random_problem(1, n_in, n_out, seed, weight_sparsity)
    isa, vbmi2 = WALKS[walk]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEFORGE_ISA", isa)
        mp.setenv("SPARSEFORGE_VBMI2", vbmi2)
        assert native().column_sparse_walk("") == walk
        _check(x, _weight(w, dtype), torch.tensor([thr]), bias, n_in)
