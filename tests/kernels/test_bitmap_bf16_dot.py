"""The batch-1 vdpbf16ps walk of bitmap weights with bf16 values (csrc/bitmap_bf16dot.h): taken when x
holds bf16 values only (a model running in bf16), against the scalar reference, float64 dense and the FMA
walk; x that is not bf16, NaN or infinity keeps the FMA walk."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.formats import BitmapWeight

from sparse_cases import exact_dense, make_case

has_walk = (kernels.cpu_supports("avx512") and "avx512_bf16" in open("/proc/cpuinfo").read()
            and "avx512_vbmi2" in open("/proc/cpuinfo").read())
pytestmark = pytest.mark.skipif(not has_walk, reason="CPU lacks AVX512_BF16 + AVX512_VBMI2")
TOL = dict(rtol=2e-5, atol=2e-5)
COLS = [1, 7, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 4100]


@pytest.fixture(autouse=True)
def avx512(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", "avx512")
    monkeypatch.setenv("SPARSEFORGE_AVX512_BF16", "auto")
    monkeypatch.setenv("SPARSEFORGE_VBMI2", "auto")


def bf16_case(rows: int, cols: int, density: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    mask = torch.rand(rows, cols, generator=gen) < density
    if rows > 2:
        mask[0] = False  # an empty row
        mask[1] = True  # a full row
    return make_case("bitmap_bf16", w, mask)


def bf16_x(cols: int, seed: int) -> torch.Tensor:
    return torch.randn(1, cols, generator=torch.Generator().manual_seed(seed)).bfloat16().float()  # (1, cols)


def fma_walk(case, x, bias=None, monkeypatch=None):
    monkeypatch.setenv("SPARSEFORGE_AVX512_BF16", "0")
    try:
        return case.run(x, bias)
    finally:
        monkeypatch.setenv("SPARSEFORGE_AVX512_BF16", "auto")


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_walk_matches_reference_dense_and_fma_walk(cols, density, monkeypatch):
    case = bf16_case(37, cols, density, seed=cols)
    x = bf16_x(cols, seed=cols + 1)
    bias = torch.randn(37)
    for b in (None, bias):
        y = case.run(x, b)
        torch.testing.assert_close(y, case.ref(x, b), **TOL)
        torch.testing.assert_close(y, exact_dense(x, case.dense, b).float(), **TOL)
        torch.testing.assert_close(y, fma_walk(case, x, b, monkeypatch), **TOL)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_do_not_change_a_bit(threads):
    case = bf16_case(1500, 700, 0.5, seed=3)  # enough work to split across threads
    x = bf16_x(700, seed=4)
    old = kernels.num_threads()
    try:
        kernels.set_num_threads(1)
        one = case.run(x)
        kernels.set_num_threads(threads)
        assert torch.equal(case.run(x), one)
    finally:
        kernels.set_num_threads(old)


def subnormal_case():
    """A weight whose stored values include a bf16 subnormal, times an x large enough that the product is
    a normal float32: vdpbf16ps treats the subnormal as zero, the FMA walk does not."""
    w = torch.zeros(2, 64)
    w[0, 3] = 1e-39  # bf16 subnormal (below 1.18e-38)
    w[1, 5] = 1.0
    case = make_case("bitmap_bf16", w, w != 0)
    x = torch.zeros(1, 64)
    x[0, 3] = 2.0**100
    x[0, 5] = 0.5
    return case, x


def test_bf16_x_takes_the_walk_and_its_subnormal_rule(monkeypatch):
    case, x = subnormal_case()
    y = case.run(x)
    assert y[0, 0].item() == 0.0  # the documented flush: a stored subnormal counts as 0
    assert y[0, 1].item() == 0.5
    assert fma_walk(case, x, monkeypatch=monkeypatch)[0, 0].item() > 1e-10  # the FMA walk keeps it
    monkeypatch.setenv("SPARSEFORGE_VBMI2", "0")  # either switch turns the walk off
    assert case.run(x)[0, 0].item() > 1e-10


def test_x_that_is_not_bf16_keeps_the_fma_walk():
    case, x = subnormal_case()
    x[0, 7] = 1.0 + 2.0**-20  # not a bf16 value (meets a pruned weight: the sum is unchanged)
    assert case.run(x)[0, 0].item() > 1e-10


def test_batches_above_one_keep_the_fma_walk():
    case, x = subnormal_case()
    assert (case.run(x.repeat(2, 1))[:, 0] > 1e-10).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_x_propagates_as_dense(bad):
    case = bf16_case(20, 96, 0.3, seed=7)
    x = bf16_x(96, seed=8)
    x[0, 10] = bad
    y = case.run(x)
    torch.testing.assert_close(y, exact_dense(x, case.dense).float(), equal_nan=True, **TOL)


def test_non_finite_values_propagate_as_dense():
    case = bf16_case(20, 96, 0.5, seed=9)
    w = case.dense.clone()
    kept = (w != 0).nonzero()
    w[tuple(kept[5])] = float("inf")
    w[tuple(kept[-1])] = float("nan")
    case = make_case("bitmap_bf16", w, (w != 0) | w.isnan())
    x = bf16_x(96, seed=10)
    torch.testing.assert_close(case.run(x), exact_dense(x, case.dense).float(), equal_nan=True, **TOL)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_property_error_within_float32_sums(rows, cols, density, seed):
    case = bf16_case(rows, cols, density, seed)
    x = bf16_x(cols, seed + 1)
    y = case.run(x)
    exact = exact_dense(x, case.dense)  # float64
    scale = (x.double().abs() @ case.dense.double().abs().T)  # sum of |products| per row
    assert ((y.double() - exact).abs() <= scale * cols * 2.0**-23 + 1e-30).all()


def test_layer_in_a_bf16_model_runs_the_walk():
    # SparseLinear with bf16 values receiving bf16 activations: the result is the walk's (subnormal rule)
    from sparseforge.nn.sparse_linear import SparseLinear

    case, x = subnormal_case()
    lin = torch.nn.Linear(64, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(case.dense)
    layer = SparseLinear.from_linear(lin.to(torch.bfloat16), "bitmap")
    assert isinstance(layer.weight_format, BitmapWeight) and layer.weight_format.dtype == torch.bfloat16
    with torch.inference_mode():
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y[0, 0].item() == 0.0 and y[0, 1].item() == 0.5
