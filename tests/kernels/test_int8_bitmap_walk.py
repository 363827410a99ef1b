"""The int8 bitmap batch-1 row walk (csrc/int8_kernels.h): rows prefetched kRowsAhead rows ahead, and the
int8-activation steps unrolled by two over two accumulator sets. Both must leave the results alone on every
ISA path: the float32 mode equal (to rounding) to the scalar reference and dense torch, the int8-activation
mode bit-exact to its reference, across row counts around the prefetch distance, column counts around the
64- and 128-column steps, and bitmaps with all-zero rows, all-zero 64-bit words and fully kept words."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.formats import BitmapWeight
from sparseforge.kernels import native

ISAS = [pytest.param(i, marks=pytest.mark.skipif(not kernels.cpu_supports(i), reason=f"CPU lacks {i}")) for i in kernels.ISAS]
TOL = dict(rtol=1e-4, atol=1e-4)


def _keep(rows: int, cols: int, density: float, seed: int, words: str) -> torch.Tensor:
    """A random mask; ``words="striped"``: 64-column words alternately all kept and all dropped, row 1 empty."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, cols, generator=gen) < density
    if words == "striped":
        word = torch.arange(cols) // 64
        keep = (word % 2 == 0).expand(rows, cols).clone()
        keep[:, cols // 2:] |= torch.rand(rows, cols - cols // 2, generator=gen) < density
        if rows > 1:
            keep[1] = False
    return keep


def _run(wt: BitmapWeight, x: torch.Tensor, *, act: str, isa: str = "", ref: bool = False, threads: int = 1):
    y = np.empty((x.shape[0], wt.shape[0]), dtype=np.float32)
    args = (x.numpy(), wt.bitmap.numpy(), wt.row_offsets.numpy(), wt.values.numpy(), wt.scales.numpy(), None, y)
    nat = native()
    if ref:
        nat.bitmap_i8_linear_ref(*args, act=act)
    else:
        before = kernels.num_threads()
        kernels.set_num_threads(threads)
        try:
            nat.bitmap_i8_linear(*args, act=act, isa=isa, algo="rows")
        finally:
            kernels.set_num_threads(before)
    return torch.from_numpy(y)


def _check(wt: BitmapWeight, x: torch.Tensor, isa: str, threads: int = 1) -> None:
    y = _run(wt, x, act="float", isa=isa, threads=threads)
    torch.testing.assert_close(y, _run(wt, x, act="float", ref=True), **TOL)
    torch.testing.assert_close(y, x @ wt.to_dense().T, **TOL)
    assert torch.equal(_run(wt, x, act="int8", isa=isa, threads=threads), _run(wt, x, act="int8", ref=True))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 40])  # below, at and past the prefetch distance of 8 rows
@pytest.mark.parametrize("cols", [1, 63, 64, 65, 127, 128, 129, 192, 2055])  # around the 64 / 128-column steps
def test_walk_matches_the_references_around_step_and_prefetch_edges(isa, rows, cols):
    wt = BitmapWeight.from_dense(torch.randn(rows, cols), _keep(rows, cols, 0.25, rows * cols, "random"),
                                 values_dtype=torch.int8)
    _check(wt, torch.randn(1, cols), isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.25, 1.0])
def test_empty_rows_empty_words_and_full_words(isa, density):
    rows, cols = 33, 640
    wt = BitmapWeight.from_dense(torch.randn(rows, cols), _keep(rows, cols, density, 3, "striped"), values_dtype=torch.int8)
    x = torch.randn(1, cols)
    _check(wt, x, isa)
    y = _run(wt, x, act="float", isa=isa)
    assert torch.equal(y[0, 1], torch.tensor(0.0))  # the empty row


@pytest.mark.parametrize("isa", ISAS)
def test_two_threads_split_rows_without_changing_the_result(isa):
    """Row tasks end where another thread's begin: prefetching past a task's last row changes nothing."""
    rows, cols = 301, 2048
    wt = BitmapWeight.from_dense(torch.randn(rows, cols), _keep(rows, cols, 0.25, 9, "random"), values_dtype=torch.int8)
    x = torch.randn(1, cols)
    for act in ("float", "int8"):
        assert torch.equal(_run(wt, x, act=act, isa=isa, threads=2), _run(wt, x, act=act, isa=isa, threads=1))
    _check(wt, x, isa, threads=2)


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(1, 400), batch=st.integers(1, 3), density=st.floats(0.0, 1.0),
       words=st.sampled_from(["random", "striped"]), seed=st.integers(0, 2**16))
def test_property_any_shape_and_mask(isa, rows, cols, batch, density, words, seed):
    wt = BitmapWeight.from_dense(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)),
                                 _keep(rows, cols, density, seed, words), values_dtype=torch.int8)
    _check(wt, torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed + 1)), isa)
