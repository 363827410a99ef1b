"""The dense bf16 GEMV (``csrc/dense_bf16.h``, :mod:`sparseforge.ops.dense_bf16`) on every kernel path
against its scalar reference and dense torch: odd shapes (``in`` not a multiple of 32, row counts not
multiples of 4), bias or none, float32 or bf16 output, NaN / inf, thread-count invariance, op checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.errors import DataError
from sparseforge.kernels import native
from sparseforge.ops._define import np_view
from sparseforge.ops.dense_bf16 import BoundDenseBf16, dense_bf16_gemv, dense_bf16_kernel

SHAPES = [(1, 1), (5, 31), (7, 33), (13, 100), (64, 256), (37, 1000), (130, 2048)]  # (out, in)
has_bf16_dot = kernels.cpu_supports("avx512") and "avx512_bf16" in open("/proc/cpuinfo").read()


@pytest.fixture(params=["scalar", "avx2", "avx512", "avx512_bf16"])
def path(request, monkeypatch):
    """Each kernel: an ISA, and within avx512 the vdpbf16ps kernel or the widening one."""
    name = request.param
    isa = "avx512" if name == "avx512_bf16" else name
    if not kernels.cpu_supports(isa) or (name == "avx512_bf16" and not has_bf16_dot):
        pytest.skip(f"CPU lacks {name}")
    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    monkeypatch.setenv("SPARSEFORGE_AVX512_BF16", "1" if name == "avx512_bf16" else "0" if isa == "avx512" else "auto")
    assert dense_bf16_kernel() == name
    return name


def _case(out: int, inp: int, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g).bfloat16()
    x = torch.randn(batch, inp, generator=g).bfloat16()
    bias = torch.randn(out, generator=g)
    return w, x, bias


def _run(w, x, bias, dtype=torch.float32, ref=False):
    y = torch.empty(x.shape[0], w.shape[0], dtype=dtype)
    if ref:
        native().dense_bf16_gemv_ref(np_view(x), np_view(w), np_view(bias), np_view(y))
    else:
        native().dense_bf16_gemv(np_view(x), np_view(w), np_view(bias), np_view(y))
    return y


def _tol(w, x, bias=None):
    """float32 summation-order bound per output: (in + 1) * eps * (sum |w||x| + |bias|), elementwise (B, out)."""
    mag = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())  # (B, out)
    return (w.shape[1] + 1) * 2.0**-23 * mag + 1e-30


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference_and_dense_torch(path, shape, with_bias):
    w, x, bias = _case(*shape, batch=3, seed=shape[0] * 7 + shape[1])
    bias = bias if with_bias else None
    got, ref = _run(w, x, bias), _run(w, x, bias, ref=True)
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())  # (B, out)
    tol = _tol(w, x, bias)
    assert ((got.double() - exact).abs() <= tol).all()
    assert ((ref.double() - exact).abs() <= tol).all()
    dense = torch.nn.functional.linear(x.float(), w.float(), bias)
    assert ((got.double() - dense.double()).abs() <= 2 * tol).all()


@pytest.mark.parametrize("shape", [(9, 45), (64, 512)])
def test_bf16_output_is_the_float32_result_rounded_once(path, shape):
    w, x, bias = _case(*shape, seed=3)
    y32, y16 = _run(w, x, bias), _run(w, x, bias, dtype=torch.bfloat16)
    assert torch.equal(y16, y32.bfloat16())  # round to nearest even of the same float32 sums
    ref16 = _run(w, x, bias, dtype=torch.bfloat16, ref=True)
    assert ((y16.float() - ref16.float()).abs() <= (ref16.float().abs() * 2.0**-8 + 1e-6)).all()  # within one bf16 ulp


def test_nan_and_inf_propagate_as_in_a_dense_product(path):
    w, x, _ = _case(6, 70, batch=2, seed=4)
    w[1, 3] = float("nan")
    w[2, 69] = float("inf")  # a tail column
    x[1, 5] = float("inf")
    got = _run(w, x, None)
    dense = torch.nn.functional.linear(x.double(), w.double()).float()
    assert torch.equal(got.isnan(), dense.isnan())
    assert torch.equal(got.isinf(), dense.isinf())
    finite = dense.isfinite()
    torch.testing.assert_close(got[finite], dense[finite], rtol=1e-4, atol=1e-4)


def test_results_do_not_depend_on_the_thread_count(path):
    w, x, bias = _case(517, 300, batch=2, seed=5)
    before = kernels.num_threads()
    try:
        ys = []
        for n in (1, 2, 3, 7):
            kernels.set_num_threads(n)
            ys.append(_run(w, x, bias))
    finally:
        kernels.set_num_threads(before)
    for y in ys[1:]:
        assert torch.equal(y, ys[0])


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 200), batch=st.integers(1, 3), seed=st.integers(0, 10_000),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_every_kernel_agrees_with_the_reference_on_random_shapes(out, inp, batch, seed, scale):
    import os

    w, x, bias = _case(out, inp, batch, seed)
    x = (x.float() * scale).bfloat16()
    exact = x.double() @ w.double().T + bias.double()
    tol = _tol(w, x, bias)
    names = [("scalar", "auto")] + [(i, "0") for i in ("avx2", "avx512") if kernels.cpu_supports(i)]
    names += [("avx512", "1")] if has_bf16_dot else []
    saved = {k: os.environ.get(k) for k in ("SPARSEFORGE_ISA", "SPARSEFORGE_AVX512_BF16")}
    try:
        for isa, bf16 in names:
            os.environ["SPARSEFORGE_ISA"], os.environ["SPARSEFORGE_AVX512_BF16"] = isa, bf16
            got = _run(w, x, bias)
            assert ((got.double() - exact).abs() <= tol).all(), (isa, bf16)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_the_op_and_the_bound_layer_give_the_kernels_bf16_output():
    w, x, bias = _case(33, 77, seed=6)
    bias16 = bias.bfloat16()
    expected = _run(w, x, bias16.float(), dtype=torch.bfloat16)
    assert torch.equal(dense_bf16_gemv(x, w, bias16), expected)
    assert torch.equal(BoundDenseBf16(w, bias16)(x), expected)
    assert torch.equal(BoundDenseBf16(w)(x), _run(w, x, None, dtype=torch.bfloat16))
    torch.library.opcheck(torch.ops.sparseforge.dense_bf16_gemv.default, (x, w, bias16))
    torch.library.opcheck(torch.ops.sparseforge.dense_bf16_gemv.default, (x, w, None))


def test_the_op_compiles():
    w, x, bias = _case(16, 64, seed=7)
    fn = torch.compile(lambda a: dense_bf16_gemv(a, w, bias), backend="eager", fullgraph=True)
    assert torch.equal(fn(x), dense_bf16_gemv(x, w, bias))


@pytest.mark.parametrize("bad", ["float x", "shape", "strided", "bias shape"])
def test_bad_input_is_a_clear_error(bad):
    w, x, bias = _case(8, 16, seed=8)
    kwargs = {"float x": (x.float(), w, None), "shape": (x[:, :8].contiguous(), w, None),
              "strided": (x, w.t().contiguous().t(), None), "bias shape": (x, w, bias[:3])}[bad]
    with pytest.raises(DataError, match="must"):
        dense_bf16_gemv(*kwargs)


def test_forcing_vdpbf16ps_runs_it_or_says_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", "avx512" if kernels.cpu_supports("avx512") else kernels.best_isa())
    monkeypatch.setenv("SPARSEFORGE_AVX512_BF16", "1")
    w, x, _ = _case(4, 8)
    if has_bf16_dot:
        assert dense_bf16_kernel() == "avx512_bf16"
        torch.testing.assert_close(_run(w, x, None), _run(w, x, None, ref=True), rtol=1e-6, atol=1e-6)
    elif kernels.cpu_supports("avx512"):
        with pytest.raises(ValueError, match="AVX512_BF16"):
            _run(w, x, None)
