"""The int8-valued bitmap / N:M / CSR kernels against their scalar reference and dense torch.

Every ISA path this CPU has is forced through SPARSEFORGE_ISA; both algorithms (rows: int8 decoded
in registers; lanes: row blocks dequantized into the float32 lanes kernels) run at batch sizes on
both sides of the switch, on odd shapes (tails of 16 / 8 columns, rows with nothing kept).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.errors import ModelError
from sparseforge.formats import BitmapWeight, NMWeight
from sparseforge.formats.csr import CSRWeight
from sparseforge.kernels import native
from sparseforge.ops import linear

ISAS = [pytest.param(i, marks=pytest.mark.skipif(not kernels.cpu_supports(i), reason=f"CPU lacks {i}")) for i in kernels.ISAS]
TOL = dict(rtol=1e-4, atol=1e-4)


class Int32Columns:
    """A CSR int8 weight handed to the kernel with int32 column indices (the format keeps uint16 up to
    65536 columns, so this path is reached directly)."""

    def __init__(self, cw: CSRWeight):
        self.cw, self.shape = cw, cw.shape

    def to_dense(self) -> torch.Tensor:
        return self.cw.to_dense()


def _weight(fmt: str, rows: int, cols: int, density: float, seed: int):
    """A random int8 weight in ``fmt`` (``bitmap``, ``csr``, ``csr32`` (int32 columns), ``2:4``, ``4:8``,
    ``1:4``); row 0 keeps nothing."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    if fmt in ("bitmap", "csr", "csr32"):
        keep = torch.rand(rows, cols, generator=gen) < density
    else:
        n, m = (int(v) for v in fmt.split(":"))
        scores = torch.rand(rows, cols // m, m, generator=gen)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(n, dim=2).indices, True)
        keep = keep.reshape(rows, cols)
    keep[0] = False
    if fmt == "bitmap":
        return BitmapWeight.from_dense(w, keep, values_dtype=torch.int8)
    if fmt.startswith("csr"):
        cw = CSRWeight.from_dense(w, keep, values_dtype=torch.int8)
        return cw if fmt == "csr" else Int32Columns(cw)
    return NMWeight.from_dense(w, fmt, keep, values_dtype=torch.int8)


def _run(wt, x, bias=None, *, ref=False, isa="", algo="auto"):
    y = np.empty((x.shape[0], wt.shape[0]), dtype=np.float32)
    b = None if bias is None else bias.numpy()
    sfx = "_ref" if ref else ""
    extra = {} if ref else {"isa": isa, "algo": algo}
    if isinstance(wt, (CSRWeight, Int32Columns)):
        cw = wt.cw if isinstance(wt, Int32Columns) else wt
        col = cw.col.to(torch.int32) if isinstance(wt, Int32Columns) else cw.col
        getattr(native(), "csr_i8_linear" + sfx)(x.numpy(), cw.row_ptr.numpy(), col.numpy(), cw.values.numpy(),
                                                cw.scales.numpy(), b, y, **extra)
    elif isinstance(wt, BitmapWeight):
        getattr(native(), "bitmap_i8_linear" + sfx)(x.numpy(), wt.bitmap.numpy(), wt.row_offsets.numpy(), wt.values.numpy(),
                                                   wt.scales.numpy(), b, y, **extra)
    else:
        getattr(native(), "nm_i8_linear" + sfx)(x.numpy(), wt.values.numpy(), wt.indices.numpy(), wt.scales.numpy(),
                                               wt.pattern.n, wt.pattern.m, b, y, **extra)
    return torch.from_numpy(y)


FORMATS = ["bitmap", "csr", "csr32", "2:4", "4:8", "1:4"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("algo", ["rows", "lanes"])
def test_forward_matches_reference_and_dense(isa, fmt, algo):
    wt = _weight(fmt, 37, 133 if fmt in ("bitmap", "csr", "csr32") else 136, 0.5, seed=1)
    bias = torch.randn(wt.shape[0])
    for batch in (1, 2, 3, 5, 17, 70):
        x = torch.randn(batch, wt.shape[1])
        y = _run(wt, x, bias, isa=isa, algo=algo)
        torch.testing.assert_close(y, _run(wt, x, bias, ref=True), **TOL)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, wt.to_dense(), bias), **TOL)


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(FORMATS), rows=st.integers(1, 40), groups=st.integers(1, 30), batch=st.integers(1, 9),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_property_any_shape(isa, fmt, rows, groups, batch, density, seed):
    unstructured = fmt in ("bitmap", "csr", "csr32")
    cols = groups * (1 if unstructured else 8) + (seed % 7 if unstructured else 0)
    wt = _weight(fmt, rows, cols, density, seed)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed))
    y = _run(wt, x, isa=isa)
    torch.testing.assert_close(y, _run(wt, x, ref=True), **TOL)
    torch.testing.assert_close(y, x @ wt.to_dense().T, **TOL)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["bitmap", "csr", "2:4"])
def test_nonfinite_inputs_propagate_like_dense(isa, fmt):
    wt = _weight(fmt, 9, 64, 0.5, seed=3)
    x = torch.randn(3, 64)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    dense = wt.to_dense()
    want = (x.double()[:, None, :] * dense.double()[None]).sum(-1).float()  # 0 * inf = NaN where not stored
    for algo in ("rows", "lanes"):
        y = _run(wt, x, isa=isa, algo=algo)
        assert torch.equal(torch.isnan(y), torch.isnan(want))


@pytest.mark.parametrize("fmt", ["bitmap", "csr", "2:4"])
def test_ops_linear_uses_the_int8_kernels(fmt):
    wt = _weight(fmt, 16, 64, 0.5, seed=4)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(linear(x, wt), x @ wt.to_dense().T, **TOL)


def test_csr_from_an_int8_bitmap_shares_values_and_scales():
    bw = _weight("bitmap", 12, 40, 0.1, seed=6)
    cw = CSRWeight.from_bitmap(bw)
    assert cw.values is bw.values and cw.scales is bw.scales
    assert torch.equal(cw.to_dense(), bw.to_dense())
    x = torch.randn(3, 40)
    torch.testing.assert_close(linear(x, cw), linear(x, bw), **TOL)


def test_bad_scales_are_model_errors():
    wt = _weight("bitmap", 4, 16, 0.5, seed=5)
    x = torch.randn(1, 16)
    y = np.empty((1, 4), dtype=np.float32)
    args = (wt.bitmap.numpy(), wt.row_offsets.numpy(), wt.values.numpy())
    with pytest.raises(ModelError, match="scales must have one entry per row"):
        native().bitmap_i8_linear(x.numpy(), *args, np.ones(3, np.float32), None, y)
    with pytest.raises(ModelError, match=r"scales\[2\].*finite and > 0"):
        native().bitmap_i8_linear(x.numpy(), *args, np.array([1, 1, 0, 1], np.float32), None, y)
    with pytest.raises(ModelError, match="values must be int8"):
        native().bitmap_i8_linear(x.numpy(), wt.bitmap.numpy(), wt.row_offsets.numpy(), wt.values.float().numpy(),
                                  wt.scales.numpy(), None, y)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "4:8"])
def test_rows_in_flight_give_the_same_bits(isa, fmt, monkeypatch):
    """SPARSEFORGE_INT8_ROWS=2 interleaves two output rows per loop of the FMA walk: each row's sum keeps its order."""
    monkeypatch.setenv("SPARSEFORGE_INT8_WALK", "fma")  # the fixed-point walk (where the CPU has it) has one row per loop
    for rows, cols in ((7, 136), (8, 264), (1, 64)):  # an odd row count leaves one row alone
        wt = _weight(fmt, rows, cols, 0.5, seed=rows)
        x, bias = torch.randn(5, cols), torch.randn(rows)
        monkeypatch.setenv("SPARSEFORGE_INT8_ROWS", "1")
        one = _run(wt, x, bias, isa=isa, algo="rows")
        monkeypatch.setenv("SPARSEFORGE_INT8_ROWS", "2")
        two = _run(wt, x, bias, isa=isa, algo="rows")
        assert torch.equal(one, two)
        torch.testing.assert_close(two, _run(wt, x, bias, ref=True), **TOL)
    if isa == "avx512" and fmt != "4:8":  # the paths that interleave rows read the setting
        monkeypatch.setenv("SPARSEFORGE_INT8_ROWS", "3")
        with pytest.raises(ValueError, match="SPARSEFORGE_INT8_ROWS"):
            _run(wt, x, bias, isa=isa, algo="rows")
