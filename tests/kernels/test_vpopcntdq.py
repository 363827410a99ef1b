"""The AVX512_VPOPCNTDQ build of the bitmap and N:M kernels against the table build, the scalar
reference and dense torch (SPARSEFORGE_VPOPCNTDQ=0 forces the table build on a CPU that has the
instructions; the rest of the suite runs whichever the CPU picks)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparse_cases import FORMATS, random_case

from sparseforge import kernels
from sparseforge.errors import ConfigError

DECODED = [f for f, (kind, *_rest) in FORMATS.items() if kind in ("bitmap", "nm")]
TOL = dict(rtol=2e-5, atol=2e-5)
needs_avx512 = pytest.mark.skipif(not kernels.cpu_supports("avx512"), reason="CPU lacks AVX-512")


def _has_vpopcntdq() -> bool:
    with open("/proc/cpuinfo") as f:
        return "avx512_vpopcntdq" in f.read()


@needs_avx512
@pytest.mark.parametrize("fmt", DECODED)
@pytest.mark.parametrize("shape", [(45, 133), (7, 64), (33, 1024), (3, 16)])  # tails, whole words, tiny
def test_both_decoders_match_reference_and_dense(fmt, shape, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", "avx512")
    case = random_case(fmt, *shape, density=0.3, seed=shape[1])
    bias = torch.randn(case.shape[0])
    for B in (1, 2, 3, 5):  # the row kernels (batch in registers)
        x = torch.randn(B, case.shape[1])
        ys = {}
        for setting in ("auto", "0"):
            monkeypatch.setenv("SPARSEFORGE_VPOPCNTDQ", setting)
            ys[setting] = case.run(x, bias, algo="rows")
            torch.testing.assert_close(ys[setting], case.ref(x, bias), **TOL)
            torch.testing.assert_close(ys[setting], torch.nn.functional.linear(x, case.dense, bias), **TOL)
        torch.testing.assert_close(ys["auto"], ys["0"], rtol=1e-6, atol=1e-6)


@needs_avx512
@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(DECODED), rows=st.integers(1, 20), cols=st.integers(1, 300),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_decoders_agree_on_random_shapes(fmt, rows, cols, density, seed):
    import os

    case = random_case(fmt, rows, cols, density=density, seed=seed)
    x = torch.randn(1, case.shape[1])
    old = {k: os.environ.get(k) for k in ("SPARSEFORGE_ISA", "SPARSEFORGE_VPOPCNTDQ")}
    try:
        os.environ["SPARSEFORGE_ISA"] = "avx512"
        out = {}
        for setting in ("auto", "0"):
            os.environ["SPARSEFORGE_VPOPCNTDQ"] = setting
            out[setting] = case.run(x, algo="rows")
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    torch.testing.assert_close(out["auto"], case.ref(x), **TOL)
    torch.testing.assert_close(out["auto"], out["0"], rtol=1e-6, atol=1e-6)


@needs_avx512
def test_bad_setting_is_a_clear_error(monkeypatch):
    case = random_case("bitmap", 8, 64, seed=0)
    monkeypatch.setenv("SPARSEFORGE_VPOPCNTDQ", "yes")
    with pytest.raises((ConfigError, ValueError), match="SPARSEFORGE_VPOPCNTDQ='yes'.*auto, 0 or 1"):
        case.run(torch.randn(1, 64), isa="avx512")


@needs_avx512
def test_forcing_it_on_without_the_instructions_is_an_error(monkeypatch):
    if _has_vpopcntdq():
        pytest.skip("this CPU has AVX512_VPOPCNTDQ")
    monkeypatch.setenv("SPARSEFORGE_VPOPCNTDQ", "1")
    with pytest.raises((ConfigError, ValueError), match="lacks AVX512_VPOPCNTDQ"):
        random_case("bitmap", 8, 64, seed=0).run(torch.randn(1, 64), isa="avx512")
