"""The zero-skipping bf16 method (csrc/linear_bf16.h ``*_linear_bf16_skip``) against the scalar oracle
and dense torch bf16, on every ISA (the ``isa`` fixture), and the measured panel / skip choice
(sparseforge.measure.bf16_method) behind ``linear_bf16_auto``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparse_cases import ALL_FORMATS, random_case
from test_linear_bf16 import assert_close_to_ref, dense_bf16, run_bf16

from sparseforge import kernels
from sparseforge.errors import ConfigError
from sparseforge.formats import BitmapWeight
from sparseforge.measure import bf16_method
from sparseforge.measure.tuning_cache import TuningCache
from sparseforge.ops import linear_bf16

SKIP_FORMATS = ("bitmap_bf16", "nm_2of4_bf16", "csr_bf16")  # bf16 values: what the skip method takes


def run_skip(case, x: torch.Tensor, bias=None) -> torch.Tensor:
    """y (B, out) float32 from the native skip method on x rounded to bf16."""
    kind, _, n, m = ALL_FORMATS[case.fmt]
    xb = x.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
    y = torch.full((x.shape[0], case.shape[0]), float("nan"))
    nm = (n, m) if kind == "nm" else ()
    getattr(kernels.native(), f"{kind}_linear_bf16")(xb, *case.bufs, *nm, bias, y.numpy(), method="skip")
    return y


@pytest.mark.parametrize("fmt", SKIP_FORMATS)
@pytest.mark.parametrize("rows,cols,batch", [(33, 100, 16), (47, 520, 17), (1, 37, 64), (64, 1030, 65), (300, 257, 40)])
def test_skip_matches_oracle_and_dense_bf16(isa, fmt, rows, cols, batch):
    case = random_case(fmt, rows, cols, density=0.3, seed=rows + cols)
    x = torch.randn(batch, case.shape[1], generator=torch.Generator().manual_seed(batch))
    bias = torch.randn(case.shape[0])
    y = run_skip(case, x, bias)
    assert_close_to_ref(y, run_bf16(case, x, bias, ref=True), x, case)
    torch.testing.assert_close(y.double(), dense_bf16(case, x, bias), rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    isa=st.sampled_from([i for i in kernels.ISAS if kernels.cpu_supports(i)]),
    fmt=st.sampled_from(SKIP_FORMATS),
    rows=st.integers(1, 90),
    cols=st.integers(4, 700),
    batch=st.integers(16, 140),
    density=st.floats(0.0, 1.0),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_property_skip_any_shape_threads_and_isa(isa, fmt, rows, cols, batch, density, threads, seed):
    case = random_case(fmt, rows, cols, density=density, seed=seed)
    x = torch.randn(batch, case.shape[1], generator=torch.Generator().manual_seed(seed))
    old = kernels.num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEFORGE_ISA", isa)
        kernels.set_num_threads(threads)
        try:
            y = run_skip(case, x)
        finally:
            kernels.set_num_threads(old)
    assert_close_to_ref(y, run_bf16(case, x, ref=True), x, case)


@pytest.mark.parametrize("fmt", SKIP_FORMATS)
def test_skip_nonfinite_x_propagates_like_dense_and_like_panel(isa, fmt):
    case = random_case(fmt, 20, 96, density=0.3, seed=3)
    x = torch.randn(18, 96)
    x[2, 5] = float("inf")
    x[7, 40] = float("nan")
    y = run_skip(case, x)
    want = dense_bf16(case, x).float()  # 0 * inf = NaN where a row does not store column 5
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.equal(torch.isnan(y), torch.isnan(run_bf16(case, x)))
    finite = ~torch.isnan(want)
    torch.testing.assert_close(y[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_skip_is_its_own_code_not_the_panel():
    """Another summation order gives other last bits: method='skip' is not silently the panel."""
    case = random_case("bitmap_bf16", 64, 1024, density=0.5, seed=7)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(run_skip(case, x), run_bf16(case, x))


def test_skip_errors_are_clear():
    case = random_case("bitmap", 4, 32)  # float32 values
    xb = torch.randn(16, 32).bfloat16().view(torch.uint16).numpy()
    y = torch.empty(16, 4).numpy()
    with pytest.raises(ConfigError, match="needs bfloat16 values"):
        kernels.native().bitmap_linear_bf16(xb, *case.bufs, None, y, method="skip")
    with pytest.raises(ConfigError, match="method 'dense' is unknown"):
        kernels.native().bitmap_linear_bf16(xb, *case.bufs, None, y, method="dense")
    w = BitmapWeight.from_dense(torch.randn(4, 32))
    with pytest.raises(ConfigError, match="needs bfloat16 values"):
        linear_bf16(torch.randn(16, 32), w, method="skip")
    with pytest.raises(ConfigError, match="unknown; use panel or skip"):
        linear_bf16(torch.randn(16, 32), w, method="fast")


def _weight(density: float = 0.1) -> BitmapWeight:
    g = torch.Generator().manual_seed(0)
    return BitmapWeight.from_dense((torch.randn(192, 384, generator=g) * (torch.rand(192, 384, generator=g) < density)).bfloat16())


def test_ops_methods_agree_with_each_other_and_autograd_runs():
    w = _weight()
    x = torch.randn(2, 24, 384, requires_grad=True)  # (..., in): batch 48
    ys = {m: linear_bf16(x, w, method=m) for m in ("panel", "skip")}
    torch.testing.assert_close(ys["skip"], ys["panel"], rtol=1e-5, atol=1e-5)
    ys["skip"].sum().backward()
    want = torch.ones(48, 192) @ w.to_dense().float()  # dx = dy @ W, rounded to bf16 (x's dtype inside the op)
    torch.testing.assert_close(x.grad.reshape(48, 384), want, rtol=8e-3, atol=1e-2)


def test_measured_method_is_cached_and_auto_follows_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSEFORGE_BF16_METHOD", raising=False)
    cache = TuningCache(tmp_path / "t.json")
    w = _weight()
    assert bf16_method.known_method(w, 64, cache=cache) is None
    name, choice = bf16_method.measured_method(w, 64, budget_s=0.02, cache=cache)
    assert name in bf16_method.METHODS and set(choice.ms) == set(bf16_method.METHODS) and not choice.cached
    stored = cache.get("bf16_method", bf16_method.method_question(w, 64))
    if stored is not None:  # a noisy machine keeps panel without caching it
        assert bf16_method.known_method(w, 50, cache=cache) == stored["name"] == name  # same batch bucket
        assert bf16_method.measured_method(w, 64, cache=cache)[1].cached
    # a float32-valued weight has one method: nothing is timed
    wf = BitmapWeight.from_dense(torch.randn(8, 32))
    assert bf16_method.measured_method(wf, 64, cache=cache) == ("panel", None)
    assert bf16_method.known_method(wf, 64, cache=cache) is None


def test_auto_uses_the_cached_answer(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSEFORGE_BF16_METHOD", raising=False)
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    w = _weight()
    calls = []
    real = kernels.native().bitmap_linear_bf16

    class Spy:
        def __getattr__(self, name):
            if name != "bitmap_linear_bf16":
                return getattr(kernels.native(), name)
            return lambda *a, **k: (calls.append(k["method"]), real(*a, **k))[1]

    import sparseforge.ops.bf16_compute as bc

    monkeypatch.setattr(bc, "native", lambda: Spy())
    x = torch.randn(64, 384)
    bf16_method.linear_bf16_auto(x, w)
    TuningCache().put("bf16_method", bf16_method.method_question(w, 64), {"name": "skip"})
    bf16_method.linear_bf16_auto(x, w)
    monkeypatch.setenv("SPARSEFORGE_BF16_METHOD", "panel")
    bf16_method.linear_bf16_auto(x, w)
    linear_bf16(x, w)  # the op itself: panel unless told
    assert calls == ["panel", "skip", "panel", "panel"]
    monkeypatch.setenv("SPARSEFORGE_BF16_METHOD", "zeros")
    with pytest.raises(ConfigError, match="SPARSEFORGE_BF16_METHOD"):
        bf16_method.linear_bf16_auto(x, w)


@pytest.mark.parametrize("fmt", ("bitmap_bf16", "nm_2of4", "csr_u16"))
@pytest.mark.parametrize("path", [p for p in kernels.BF16_PATHS if kernels.bf16_path_supported(p)])
def test_panel_rows_longer_than_one_amx_strip(path, fmt):
    """in > kBf16AmxColBlock (4096) several times over: the AMX strip runs per column block, the
    accumulators parked between blocks; every path against the oracle (rows span several 32-row blocks,
    odd batch)."""
    case = random_case(fmt, 70, 12288 + 200, density=0.2, seed=5)
    x = torch.randn(33, case.shape[1], generator=torch.Generator().manual_seed(5))
    bias = torch.randn(case.shape[0])
    y = run_bf16(case, x, bias, path)
    assert_close_to_ref(y, run_bf16(case, x, bias, ref=True), x, case)


@pytest.mark.parametrize("method", ("panel", "skip"))
@pytest.mark.parametrize("fmt", SKIP_FORMATS)
def test_float32_x_is_rounded_in_the_kernel_like_a_bf16_x(fmt, method):
    """float32 x goes to the kernel as it is and is rounded there (nearest even): the same bits as
    rounding it in torch first, on every path, NaN included."""
    kind, _, n, m = ALL_FORMATS[fmt]
    case = random_case(fmt, 40, 300, density=0.3, seed=11)
    x = torch.randn(33, 300, generator=torch.Generator().manual_seed(11)) * 3
    x[3, 7] = float("nan")
    nm = (n, m) if kind == "nm" else ()
    fn = getattr(kernels.native(), f"{kind}_linear_bf16")
    ys = []
    for xin in (x.contiguous().numpy(), x.to(torch.bfloat16).view(torch.uint16).numpy()):
        y = torch.empty(33, 40)
        fn(xin, *case.bufs, *nm, None, y.numpy(), method=method)
        ys.append(y)
    assert torch.equal(ys[0].nan_to_num(7.0), ys[1].nan_to_num(7.0)) and torch.equal(ys[0].isnan(), ys[1].isnan())
    yr = torch.empty(33, 40)
    getattr(kernels.native(), f"{kind}_linear_bf16_ref")(x.contiguous().numpy(), *case.bufs, *nm, None, yr.numpy())
    assert_close_to_ref(ys[0].nan_to_num(0.0), yr.nan_to_num(0.0), x.nan_to_num(0.0), case)
    w = BitmapWeight.from_dense(case.dense.to(torch.bfloat16))
    assert torch.equal(linear_bf16(x[4:], w, method=method), linear_bf16(x[4:].bfloat16(), w, method=method))
