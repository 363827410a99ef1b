"""The int8-activation mode of the int8-valued bitmap / N:M kernels (``act="int8"``, csrc/int8.h I8Act::int8).

x is quantized per batch row (symmetric, amax / 127), the products summed exactly in integers. Every
path (scalar: the portable loop; AVX2 with and without AVX-VNNI; AVX-512 with the VNNI / VBMI / VBMI2
kernels, and without them the AVX2 kernels; forced through the ``isa`` argument and
SPARSEFORGE_INT8_VNNI) must give exactly the reference's result, the reference
must be the documented formula (recomputed here in torch), and the result must stay within the
documented bound of the float32 mode (and of dense torch on the dequantized weight).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.formats import BitmapWeight, NMWeight
from sparseforge.kernels import native

ISAS = [pytest.param(i, marks=pytest.mark.skipif(not kernels.cpu_supports(i), reason=f"CPU lacks {i}")) for i in kernels.ISAS]
FORMATS = ["bitmap", "2:4", "4:8", "1:4", "4:16", "2:16", "8:16"]  # n:16: the AVX2 nibble-shuffle kernels


def _cols(fmt: str, cols: int) -> int:
    """``cols`` rounded up to whole groups of the format."""
    m = 8 if fmt == "bitmap" else int(fmt.split(":")[1])
    return -(-cols // m) * m


def _has_int8_vnni() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    return kernels.cpu_supports("avx512") and {"avx512_vnni", "avx512vbmi", "avx512_vbmi2"} <= flags


# "auto" runs the VNNI kernels of the path where the CPU has them; "0" the path's kernels without VNNI
VNNI = ["auto", "0"]


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(f.read().split())


def test_the_switch_picks_the_named_kernels(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_INT8_VNNI", "0")
    assert kernels.int8_act_path("scalar") == "portable"
    for isa in ("avx2", "avx512"):
        if kernels.cpu_supports(isa):
            assert kernels.int8_act_path(isa) == "avx2"  # the AVX2 vpmaddubsw kernels
    monkeypatch.setenv("SPARSEFORGE_INT8_VNNI", "auto")
    if kernels.cpu_supports("avx2"):
        assert kernels.int8_act_path("avx2") == ("avx2_vnni" if "avx_vnni" in _cpu_flags() else "avx2")
    if kernels.cpu_supports("avx512"):
        assert kernels.int8_act_path("avx512") == ("avx512_vnni" if _has_int8_vnni() else "avx2")


def _weight(fmt: str, rows: int, cols: int, density: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    if fmt == "bitmap":
        keep = torch.rand(rows, cols, generator=gen) < density
        keep[0] = False
        return BitmapWeight.from_dense(w, keep, values_dtype=torch.int8)
    n, m = (int(v) for v in fmt.split(":"))
    scores = torch.rand(rows, cols // m, m, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(n, dim=2).indices, True).reshape(rows, cols)
    return NMWeight.from_dense(w, fmt, keep, values_dtype=torch.int8)


def _run(wt, x, bias=None, *, ref=False, isa="", algo="auto", act="int8"):
    y = np.empty((x.shape[0], wt.shape[0]), dtype=np.float32)
    b = None if bias is None else bias.numpy()
    kw = {"act": act} if ref else {"isa": isa, "algo": algo, "act": act}
    sfx = "_ref" if ref else ""
    if isinstance(wt, BitmapWeight):
        getattr(native(), "bitmap_i8_linear" + sfx)(x.numpy(), wt.bitmap.numpy(), wt.row_offsets.numpy(),
                                                   wt.values.numpy(), wt.scales.numpy(), b, y, **kw)
    else:
        getattr(native(), "nm_i8_linear" + sfx)(x.numpy(), wt.values.numpy(), wt.indices.numpy(), wt.scales.numpy(),
                                               wt.pattern.n, wt.pattern.m, b, y, **kw)
    return torch.from_numpy(y)


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented quantizer: xq = clamp(round_half_even(x * (127 / amax)), +-127), sx = amax / 127."""
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(x * inv[:, None]).clamp(-127, 127).to(torch.int64)
    return xq, amax / 127


def _int_weight(wt) -> torch.Tensor:
    """The stored int8 values at their columns, (rows, cols) int64."""
    return torch.round(wt.to_dense() / wt.scales[:, None]).to(torch.int64)


def _bound(wt, x) -> torch.Tensor:
    """|y_int8 - y_f32| <= scales[r] * sum_j |q[r, j]| * sx[b] / 2 (B, rows), plus float32 rounding."""
    _, sx = _quantize(x)
    qabs = _int_weight(wt).abs().sum(dim=1).float()
    return (sx[:, None] / 2) * (wt.scales * qabs)[None, :] * (1 + 1e-4) + 1e-4


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vnni", VNNI)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_path_equals_the_reference_exactly(isa, vnni, fmt, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_INT8_VNNI", vnni)
    for rows, cols in ((37, 136), (5, 8), (9, 264), (3, 1032)):  # 64-value / 128-column tails, whole steps
        cols = _cols(fmt, cols)
        wt = _weight(fmt, rows, cols, 0.5, seed=cols)
        bias = torch.randn(rows)
        for batch in (1, 2, 3, 5, 17):
            x = torch.randn(batch, cols)
            want = _run(wt, x, bias, ref=True)
            assert torch.equal(_run(wt, x, bias, isa=isa), want)
            assert torch.equal(_run(wt, x, bias, isa=isa, algo="rows"), want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_is_the_documented_formula(fmt):
    cols = _cols(fmt, 200)
    wt = _weight(fmt, 23, cols, 0.4, seed=7)
    bias = torch.randn(23)
    x = torch.randn(4, cols) * torch.tensor([[1.0], [1e-3], [50.0], [0.0]])  # scales apart; an all-zero row
    xq, sx = _quantize(x)
    acc = (xq @ _int_weight(wt).T).to(torch.float32)  # exact: |sums| << 2^24
    want = wt.scales[None, :] * (sx[:, None] * acc) + bias
    assert torch.equal(_run(wt, x, bias, ref=True), want)
    assert torch.equal(_run(wt, x, bias, ref=True)[3], bias)  # x = 0: y = bias, no NaN


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(FORMATS), rows=st.integers(1, 20), groups=st.integers(1, 40), batch=st.integers(1, 6),
       density=st.floats(0.0, 1.0), scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_property_exact_to_reference_and_within_the_bound(isa, fmt, rows, groups, batch, density, scale, seed):
    cols = _cols(fmt, groups * 8)
    wt = _weight(fmt, rows, cols, density, seed)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed)) * scale
    y = _run(wt, x, isa=isa)
    assert torch.equal(y, _run(wt, x, ref=True))
    y_float = _run(wt, x, isa=isa, act="float")
    assert bool(((y - y_float).abs() <= _bound(wt, x)).all())
    dense = x.double() @ wt.to_dense().double().T
    assert bool(((y.double() - dense).abs() <= _bound(wt, x).double() + 1e-3 * dense.abs()).all())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vnni", VNNI)
@pytest.mark.parametrize("fmt", ["bitmap", "2:4", "4:16"])
def test_sums_beyond_int32_are_exact(isa, vnni, fmt, monkeypatch):
    """|dot| up to 127 * 127 * 140000 > 2^31: the kernels reduce int32 lanes into int64 per chunk."""
    monkeypatch.setenv("SPARSEFORGE_INT8_VNNI", vnni)
    cols = {"2:4": 280_008, "4:16": 560_016}.get(fmt, 140_008)
    wt = _weight(fmt, 2, cols, 1.0, seed=1)
    wt.values.copy_(torch.where(torch.arange(wt.values.numel()).reshape(wt.values.shape) % 3 == 0, -127, 127))
    x = torch.where(_int_weight(wt)[1] > 0, 1.0, -1.0)[None, :]  # each product +127 * 127 on row 1
    want = _run(wt, x, ref=True)
    assert abs(float(want[0, 1]) / float(wt.scales[1]) - 127 * 127 * int((_int_weight(wt)[1] != 0).sum()) / 127) < 1e3
    assert torch.equal(_run(wt, x, isa=isa), want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
def test_nonfinite_x_runs_the_float_mode(isa, fmt):
    wt = _weight(fmt, 9, 64, 0.5, seed=3)
    x = torch.randn(3, 64)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    y = _run(wt, x, isa=isa)
    assert torch.equal(y.isnan(), _run(wt, x, isa=isa, act="float").isnan())
    torch.testing.assert_close(y, _run(wt, x, isa=isa, act="float"), equal_nan=True)
    torch.testing.assert_close(_run(wt, x, ref=True), _run(wt, x, ref=True, act="float"), equal_nan=True)


def test_bad_settings_are_clear_errors(monkeypatch):
    wt = _weight("2:4", 4, 16, 0.5, seed=5)
    x = torch.randn(1, 16)
    with pytest.raises(ValueError, match="act='int4' is not an activation mode; use 'float' or 'int8'"):
        _run(wt, x, act="int4")
    with pytest.raises(ValueError, match="algo='lanes' is float32 only"):
        _run(wt, x, algo="lanes")
    monkeypatch.setenv("SPARSEFORGE_INT8_VNNI", "yes")
    with pytest.raises(ValueError, match="SPARSEFORGE_INT8_VNNI='yes' is not a setting"):
        _run(wt, x, isa="avx512" if kernels.cpu_supports("avx512") else "")
        if not kernels.cpu_supports("avx512"):
            raise ValueError("SPARSEFORGE_INT8_VNNI='yes' is not a setting")  # only the avx512 path reads it


def test_the_vnni_kernels_are_used_where_the_cpu_has_them(monkeypatch):
    monkeypatch.delenv("SPARSEFORGE_INT8_VNNI", raising=False)
    assert native().int8_vnni() == _has_int8_vnni()
    monkeypatch.setenv("SPARSEFORGE_INT8_VNNI", "0")
    assert native().int8_vnni() is False
    monkeypatch.setenv("SPARSEFORGE_INT8_VNNI", "1")
    if _has_int8_vnni():
        assert native().int8_vnni() is True
    else:
        with pytest.raises(ValueError, match="lacks AVX512 VNNI / VBMI / VBMI2"):
            native().int8_vnni()


@pytest.mark.parametrize("vnni", VNNI)
@pytest.mark.parametrize("fmt", FORMATS)
def test_float_mode_of_both_avx512_builds(vnni, fmt, monkeypatch):
    """SPARSEFORGE_INT8_VNNI also picks the float32-activation kernels of the avx512 path (the VBMI2
    build expand-loads bitmap rows): both against the reference and dense torch, on tails."""
    if not kernels.cpu_supports("avx512"):
        pytest.skip("CPU lacks avx512")
    monkeypatch.setenv("SPARSEFORGE_INT8_VNNI", vnni)
    for rows, cols in ((37, 136), (5, 8), (9, 264), (3, 1032)):
        cols = _cols(fmt, cols)
        wt = _weight(fmt, rows, cols, 0.5, seed=cols)
        bias = torch.randn(rows)
        for batch in (1, 2, 3, 5):
            x = torch.randn(batch, cols)
            y = _run(wt, x, bias, isa="avx512", algo="rows", act="float")
            torch.testing.assert_close(y, _run(wt, x, bias, ref=True, act="float"), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(y, torch.nn.functional.linear(x, wt.to_dense(), bias), rtol=1e-4, atol=1e-4)
