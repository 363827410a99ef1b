"""The float32-activation mode's fixed-point walk of the int8 bitmap / N:M batch-1 kernels (csrc/int8.h
``FixedX``): x as 24-bit fixed point in three limb bytes, exact integer row sums by vpdpbusd.

Where the walk runs (``int8_float_walk(isa) == "fixed_x"``: AVX512 VNNI + VBMI + VBMI2) its output must be
bit-identical to its scalar oracle (``*_linear_fx_ref``) for every shape, density, batch 1-3 and thread
count; on every path the float mode stays within the kernels' tolerance of the float32 reference and of
dense torch; the oracle itself stays within the documented bound of the exact (float64) product;
NaN / inf in x, an x too small for the fixed point, and ``SPARSEFORGE_INT8_WALK=fma`` take the FMA walk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.errors import ConfigError
from sparseforge.formats import BitmapWeight, NMWeight
from sparseforge.kernels import native

ISAS = [pytest.param(i, marks=pytest.mark.skipif(not kernels.cpu_supports(i), reason=f"CPU lacks {i}")) for i in kernels.ISAS]
TOL = dict(rtol=1e-4, atol=1e-4)
FX_MAX = 2**23 - 1


def _weight(fmt: str, rows: int, cols: int, density: float, seed: int):
    """A random int8 weight: ``bitmap`` at ``density`` (row 0 empty when rows > 1), or N:M ``n:m``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    if fmt == "bitmap":
        keep = torch.rand(rows, cols, generator=gen) < density
        if rows > 1:
            keep[0] = False
        return BitmapWeight.from_dense(w, keep, values_dtype=torch.int8)
    n, m = (int(v) for v in fmt.split(":"))
    scores = torch.rand(rows, cols // m, m, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(n, dim=2).indices, True)
    return NMWeight.from_dense(w, fmt, keep.reshape(rows, cols), values_dtype=torch.int8)


def _args(wt, x, bias, y):
    b = None if bias is None else bias.numpy()
    if isinstance(wt, BitmapWeight):
        return "bitmap_i8", (x.numpy(), wt.bitmap.numpy(), wt.row_offsets.numpy(), wt.values.numpy(), wt.scales.numpy(), b, y)
    return "nm_i8", (x.numpy(), wt.values.numpy(), wt.indices.numpy(), wt.scales.numpy(), wt.pattern.n, wt.pattern.m, b, y)


def _run(wt, x, bias=None, *, kind="fast", isa="", algo="rows", threads=1):
    """kind: ``fast`` (the dispatched kernel, act='float'), ``ref`` (the float32 reference) or ``fx_ref``."""
    y = np.empty((x.shape[0], wt.shape[0]), dtype=np.float32)
    name, args = _args(wt, x, bias, y)
    nat = native()
    if kind == "ref":
        getattr(nat, name + "_linear_ref")(*args)
    elif kind == "fx_ref":
        getattr(nat, name + "_linear_fx_ref")(*args)
    else:
        before = kernels.num_threads()
        kernels.set_num_threads(threads)
        try:
            getattr(nat, name + "_linear")(*args, isa=isa, algo=algo)
        finally:
            kernels.set_num_threads(before)
    return torch.from_numpy(y)


def _fixed(isa: str, wt=None) -> bool:
    """Whether a float-mode call of wt (a bitmap one by default) on path isa takes the fixed-point walk."""
    n, m = (wt.pattern.n, wt.pattern.m) if isinstance(wt, NMWeight) else (0, 0)
    return native().int8_float_walk(isa, n, m) == "fixed_x"


def _check(wt, x, isa, bias=None, threads=1):
    y = _run(wt, x, bias, isa=isa, threads=threads)
    torch.testing.assert_close(y, _run(wt, x, bias, kind="ref"), **TOL)
    dense = x @ wt.to_dense().T + (0 if bias is None else bias)
    torch.testing.assert_close(y, dense, **TOL)
    if _fixed(isa, wt):
        assert torch.equal(y, _run(wt, x, bias, kind="fx_ref"))


def test_the_walk_runs_where_the_cpu_has_vnni_vbmi_and_vbmi2():
    nat = native()
    if kernels.cpu_supports("avx512") and nat.int8_vnni():
        assert nat.int8_float_walk("avx512") == "fixed_x"
        assert nat.int8_float_walk("avx512", 4, 8) == "fixed_x"
    if kernels.cpu_supports("avx512"):
        assert nat.int8_float_walk("avx512", 2, 4) == "fma"  # 2:4 keeps its vpermt2ps walk
    for isa in ("", "avx2"):  # the public wrapper asks the same question
        assert kernels.int8_float_walk(isa) == nat.int8_float_walk(isa)
        assert kernels.int8_float_walk(isa, "2:4") == "fma"
        assert kernels.int8_float_walk(isa, "4:8") == nat.int8_float_walk(isa, 4, 8)
    for isa in ("avx2", "scalar"):
        if kernels.cpu_supports(isa):
            assert nat.int8_float_walk(isa) == "fma"
    for bad in ("0.75", "block4x4"):  # not a pattern / not n:m: a one-line ConfigError
        with pytest.raises(ConfigError):
            kernels.int8_float_walk("", bad)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "4:8"])
@pytest.mark.parametrize("cols", [8, 56, 64, 72, 120, 128, 136, 248, 2056])  # around the 64 / 128-column steps
def test_matches_the_references_around_step_edges(isa, fmt, cols):
    rows = 11
    wt = _weight(fmt, rows, cols, 0.25, cols)
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(cols + 1))
    _check(wt, x, isa, bias=torch.randn(rows))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_every_density_and_batch_row(isa, density, batch):
    rows, cols = 37, 1000
    wt = _weight("bitmap", rows, cols, density, int(density * 100) + batch)
    _check(wt, torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)), isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_two_threads_give_the_same_bits(isa, fmt):
    rows, cols = 301, 2048
    wt = _weight(fmt, rows, cols, 0.25, 5)
    x = torch.randn(2, cols)
    y1 = _run(wt, x, isa=isa, threads=1)
    assert torch.equal(_run(wt, x, isa=isa, threads=2), y1)
    _check(wt, x, isa, threads=2)


@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "4:8"])
@pytest.mark.parametrize("magnitude", [1e-20, 1.0, 1e30])
def test_the_oracle_stays_within_the_fixed_point_bound(fmt, magnitude):
    """|y - exact| <= scale * sum|q| * sx / 2 plus float32 rounding of y, sx = amax / (2^23 - 1)."""
    rows, cols = 29, 704
    wt = _weight(fmt, rows, cols, 0.5, 7)
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(8)) * magnitude
    x[1, 3] = 40 * magnitude  # one outlier: a coarse fixed-point step for the other elements
    y = _run(wt, x, kind="fx_ref").double()
    q = (wt.to_dense().double() / wt.scales.double()[:, None]).round()  # the int8 values as stored
    exact = (x.double() @ q.T) * wt.scales.double()
    sx = x.double().abs().amax(dim=1, keepdim=True) / FX_MAX
    bound = (q.abs().sum(dim=1) * wt.scales.double())[None, :] * sx / 2 + exact.abs() * 2**-23
    assert torch.all((y - exact).abs() <= bound)


@pytest.mark.parametrize("batch", [1, 2])
def test_long_rows_reduce_their_lanes_before_they_wrap(batch):
    """Rows of 2.2M stored columns with every product at its largest (q = 127, every limb byte 255 / 127):
    one row's int32 lanes would pass 2^31 after ~16.4k steps per accumulator set, so the walk must reduce
    them into int64 chunk by chunk (the one-row and the batch-in-registers walks alike); a tail of 37
    columns ends the row inside a 64-column step."""
    rows, cols = 2, 2_200_000 + 37
    keep = torch.ones(rows, cols, dtype=torch.bool)
    keep[1, ::3] = False  # the second row's values run at another offset
    wt = BitmapWeight.from_dense(torch.ones(rows, cols), keep, values_dtype=torch.int8)
    x = torch.ones(batch, cols)
    x[-1, ::2] = -1.0  # a mixed-sign row when batch 2
    y = _run(wt, x, algo="rows")
    exact = x.double() @ keep.double().T * 127 * wt.scales.double()
    if _fixed(""):
        assert torch.equal(y, _run(wt, x, kind="fx_ref"))
        assert torch.allclose(y.double(), exact, rtol=2**-22, atol=0)
    else:
        # the float32 FMA walk (no fixed-point walk on this CPU): each of its 8-16 lanes sums ~2^18
        # products of 127 of one sign, so the error is float32 rounding of partial sums near 2^25,
        # far below a wrapped int32 (which would be off by ~2^32 * scale)
        magnitude = x.abs().double() @ keep.double().T * 127 * wt.scales.double()
        assert torch.all((y.double() - exact).abs() <= magnitude * (cols / 8) * 2**-24)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["bitmap", "4:8"])
def test_extreme_limbs_and_values_stay_exact(isa, fmt):
    """x whose fixed-point values span the signed top byte (-2^23 + 1 .. 2^23 - 1, both signs of every byte
    boundary) against int8 values of +-127 everywhere they are stored: the walk's top-plane offset (values
    flipped to q + 128, 128 * sum of the top bytes subtracted) must cancel exactly, against the exact product."""
    rows, cols = 24, 1096
    gen = torch.Generator().manual_seed(11)
    signs = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -1.0, 1.0)
    signs[1] = 1.0  # rows of one sign: the largest sums either way
    signs[2] = -1.0
    if fmt == "bitmap":
        keep = torch.rand(rows, cols, generator=gen) < 0.6
        keep[1:3] = True
        wt = BitmapWeight.from_dense(signs, keep, values_dtype=torch.int8)
    else:
        wt = _weight(fmt, rows, cols, 0.5, 11)
        wt = NMWeight.from_dense(signs, fmt, wt.to_dense() != 0, values_dtype=torch.int8)
    steps = torch.tensor([1, 2**8 - 1, 2**8, 2**16 - 1, 2**16, 2**16 + 1, 2**22, FX_MAX - 1, FX_MAX], dtype=torch.float64)
    fixed = torch.cat([steps, -steps])  # X values at the byte boundaries, both signs
    fixed = fixed.repeat(cols // fixed.numel() + 1)[:cols]
    fixed[0] = FX_MAX  # amax: x * inv maps back onto the integers
    x = (fixed / FX_MAX).float()[None, :]
    x = torch.cat([x, -x, x.roll(5, dims=1)])  # batch 3: the negated row flips every top byte
    y = _run(wt, x, isa=isa)
    assert torch.equal(y, _run(wt, x, kind="fx_ref")) or not _fixed(isa, wt)
    q = (wt.to_dense().double() / wt.scales.double()[:, None]).round()
    assert q.abs().max() == 127
    exact = (x.double() @ q.T) * wt.scales.double()
    sx = x.double().abs().amax(dim=1, keepdim=True) / FX_MAX
    bound = (q.abs().sum(dim=1) * wt.scales.double())[None, :] * sx / 2 + exact.abs() * 2**-23 + 1e-30
    assert torch.all((y.double() - exact).abs() <= bound + 1e-4 * (not _fixed(isa, wt)) * exact.abs().clamp(min=1))


@pytest.mark.parametrize("isa", ISAS)
def test_zero_x_gives_the_bias(isa):
    wt = _weight("bitmap", 9, 300, 0.5, 2)
    bias = torch.randn(9)
    y = _run(wt, torch.zeros(1, 300), bias, isa=isa)
    assert torch.equal(y[0], bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_nonfinite_and_tiny_x_take_the_fma_walk(isa, fmt):
    rows, cols = 13, 256
    wt = _weight(fmt, rows, cols, 0.5, 4)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(3))
    x[0, 5], x[1, 9] = float("nan"), float("inf")
    y = _run(wt, x, isa=isa)
    dense = wt.to_dense()
    expected = x @ dense.T  # dense semantics: NaN row, and inf * 0 = NaN where column 9 is not stored
    torch.testing.assert_close(y, expected, equal_nan=True, **TOL)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[2]).all()
    tiny = torch.randn(1, cols) * 1e-33  # amax below kFxMinAmax: no fixed point, the FMA walk (float32 result)
    yt = _run(wt, tiny, isa=isa)
    torch.testing.assert_close(yt, tiny @ dense.T, rtol=1e-4, atol=1e-40)  # a fixed point of amax < 1e-30 would overflow
    assert torch.equal(_run(wt, tiny, kind="fx_ref"), _run(wt, tiny, kind="ref"))  # so does the oracle's


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_the_lanes_path_and_batch_four_keep_the_float32_kernels(fmt):
    """Batch >= 4 (auto) and algo='lanes' run the dequantized lanes kernels, not the fixed-point walk."""
    wt = _weight(fmt, 17, 320, 0.5, 6)
    x = torch.randn(4, 320, generator=torch.Generator().manual_seed(6))
    fx = _run(wt, x, kind="fx_ref")
    for algo, xb in (("auto", x), ("lanes", x[:1])):
        y = _run(wt, xb, algo=algo)
        torch.testing.assert_close(y, _run(wt, xb, kind="ref"), **TOL)
        assert not torch.equal(y, fx[: xb.shape[0]])


def test_the_environment_forces_the_fma_walk(monkeypatch):
    wt = _weight("bitmap", 33, 1000, 0.5, 9)
    x = torch.randn(1, 1000, generator=torch.Generator().manual_seed(9))
    fixed = _run(wt, x)
    monkeypatch.setenv("SPARSEFORGE_INT8_WALK", "fma")
    assert native().int8_float_walk("") == "fma"
    fma = _run(wt, x)
    torch.testing.assert_close(fma, _run(wt, x, kind="ref"), **TOL)
    if kernels.cpu_supports("avx512") and native().int8_vnni():
        assert not torch.equal(fma, fixed)  # another walk, other bits
    monkeypatch.setenv("SPARSEFORGE_INT8_WALK", "fast")
    with pytest.raises(ValueError, match="SPARSEFORGE_INT8_WALK='fast'"):
        _run(wt, x)


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 300), batch=st.integers(1, 3), density=st.floats(0.0, 1.0),
       fmt=st.sampled_from(["bitmap", "2:4"]), scale=st.sampled_from([1e-6, 1.0, 1e6]), seed=st.integers(0, 2**16))
def test_property_any_shape_mask_and_scale(isa, rows, cols, batch, density, fmt, scale, seed):
    if fmt == "2:4":
        cols = max(4, cols // 4 * 4)
    wt = _weight(fmt, rows, cols, density, seed)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed + 1)) * scale
    y = _run(wt, x, isa=isa)
    torch.testing.assert_close(y, _run(wt, x, kind="ref"), rtol=1e-4, atol=1e-4 * scale)
    if _fixed(isa, wt):
        assert torch.equal(y, _run(wt, x, kind="fx_ref"))
