"""bf16x3 matmuls (csrc/gemm_bf16x3*, sparseforge.ops.bf16x3) and MoE(matmul_precision="bf16x3").

Kernel paths are checked against float64 torch and against each other; every path this machine
runs is tested (the scalar reference runs everywhere, AMX where the CPU has it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseforge.ops.bf16x3 as x3
from sparseforge.errors import ConfigError, DataError
from sparseforge.moe import MoE
from sparseforge.moe.bf16x3 import Bf16x3Matmul

PATHS = ["scalar"] + (["amx"] if x3.amx_available() else [])
FLT_MIN = 1.1754943508222875e-38


def _bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise error bound of bf16x3 vs exact: ~3 * 2^-16 of |a| @ |b| (plus float32 sums)."""
    return (a.abs().double() @ b.abs().double()) * (2.0**-14)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 7, 9), (33, 70, 40), (64, 64, 64), (100, 129, 47)])
def test_matmul_matches_float64(path, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    y = x3.matmul(x3.pack(a), x3.pack(b, as_b=True), path=path)
    exact = a.double() @ b.double()
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert bool(((y.double() - exact).abs() <= _bound(a, b)).all())
    # much closer than one bf16 product: the split is what makes it float32-accurate
    one_bf16 = a.bfloat16().double() @ b.bfloat16().double()
    if M * N * K > 100:
        assert (y.double() - exact).abs().max() < 0.05 * (one_bf16 - exact).abs().max()


@pytest.mark.parametrize("path", PATHS)
def test_strided_operands_and_accumulate(path):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 37, generator=g).t()  # (37, 50), transposed view
    b = torch.randn(45, 50, generator=g).t()  # (50, 45)
    c0 = torch.randn(37, 45, generator=g)
    out = torch.zeros(37, 60)[:, 5:50]  # row stride 60, unit column stride
    out.copy_(c0)
    x3.matmul(x3.pack(a), x3.pack(b, as_b=True), out=out, accumulate=True, path=path)
    exact = c0.double() + a.double() @ b.double()
    assert bool(((out.double() - exact).abs() <= _bound(a, b) + 1e-6).all())


def test_amx_and_scalar_paths_agree():
    if len(PATHS) == 1:
        assert not x3.amx_available()
        return
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(70, 300, generator=g), torch.randn(300, 90, generator=g)
    pa, pb = x3.pack(a), x3.pack(b, as_b=True)
    ys, ya = x3.matmul(pa, pb, path="scalar"), x3.matmul(pa, pb, path="amx")
    assert torch.allclose(ys, ya, rtol=1e-5, atol=1e-5 * float(ys.abs().max()))


@pytest.mark.parametrize("path", PATHS)
def test_inf_and_nan_stay_non_finite(path):
    a, b = torch.randn(20, 40), torch.randn(40, 18)
    a[3, 5] = math.inf
    a[7, 1] = math.nan
    b[2, 4] = -math.inf
    y = x3.matmul(x3.pack(a), x3.pack(b, as_b=True), path=path)
    ref = a @ b
    # NaN where float32 has NaN; where float32 has +-inf, bf16x3 has inf or NaN (a zero lo part times
    # an infinite hi part of the other operand is 0 * inf); the rest finite and close
    assert bool(torch.isnan(y)[torch.isnan(ref)].all())
    assert not bool(torch.isfinite(y)[torch.isinf(ref)].any())
    finite = torch.isfinite(ref)
    assert bool(torch.isfinite(y[finite]).all())
    a0, b0 = a.nan_to_num(0.0, 0.0, 0.0), b.nan_to_num(0.0, 0.0, 0.0)
    assert bool(((y - ref).abs().double()[finite] <= _bound(a0, b0)[finite] + 1e-6).all())


_normal = st.floats(min_value=-3.0000000054977558e+38, max_value=3.0000000054977558e+38, allow_nan=False, allow_infinity=False, width=32).filter(
    lambda v: v == 0 or abs(v) >= FLT_MIN)


@settings(max_examples=60, deadline=None)
@given(st.lists(_normal, min_size=1, max_size=70))
def test_split_hi_plus_lo_reconstructs_within_bf16_rounding(values):
    x = torch.tensor(values, dtype=torch.float32)
    hi, lo = x3.split(x)
    assert torch.equal(hi, x.to(torch.bfloat16))  # hi: round to nearest even, as torch converts
    resid = x.double() - hi.double()
    # lo is the residual rounded to bf16 (8 significant bits) unless the residual is subnormal
    assert bool(((lo.double() - resid).abs() <= resid.abs() * 2.0**-8 + 2 * FLT_MIN).all())
    assert bool(((hi.double() + lo.double() - x.double()).abs() <= x.double().abs() * 2.0**-16 + 2 * FLT_MIN).all())


def test_split_specials():
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-40, 3e38])
    hi, lo = x3.split(x)
    assert hi[0] == math.inf and hi[1] == -math.inf and torch.isnan(hi[2])
    assert torch.equal(lo[:3].float(), torch.zeros(3))  # lo of inf / NaN is 0: no inf - inf
    assert hi[5] == 0 and lo[5] == 0  # subnormals read as zero (AMX's bf16 arithmetic)
    assert abs(float(hi[6]) + float(lo[6]) - 3e38) <= 3e38 * 2**-16


def test_bad_operands_raise_clear_errors():
    a = x3.pack(torch.randn(4, 8))
    with pytest.raises(DataError, match="inner sizes"):
        x3.matmul(a, x3.pack(torch.randn(9, 3), as_b=True))
    with pytest.raises(DataError, match="as_b"):
        x3.matmul(a, a)
    with pytest.raises(DataError, match="float32"):
        x3.pack(torch.randn(4, 8).double())
    with pytest.raises(ConfigError, match="unknown"):
        Bf16x3Matmul(path="avx")


def _pair(path, monkeypatch, **kw):
    """A float32 layer and its bf16x3 twin (same weights) running `path`."""
    torch.manual_seed(0)
    ref = MoE(48, 80, 6, k=2, **kw)
    if path == "amx":
        twin = MoE(48, 80, 6, k=2, matmul_precision="bf16x3", **kw)
    else:  # the reference path, on any CPU
        monkeypatch.setattr(x3, "amx_available", lambda: True)
        twin = MoE(48, 80, 6, k=2, matmul_precision="bf16x3", **kw)
        twin._bf16x3 = Bf16x3Matmul(path="scalar")
    twin.load_state_dict(ref.state_dict())
    return ref, twin


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("expert", ["glu", "mlp"])
def test_layer_forward_and_gradients_match_float32(path, expert, monkeypatch):
    ref, twin = _pair(path, monkeypatch, expert=expert, activation="silu" if expert == "glu" else "gelu")
    x = torch.randn(2, 37, 48)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, _ = ref(xa)
    yb, _ = twin(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert _rel(yb, ya) < 1e-4 and _rel(xb.grad, xa.grad) < 1e-4
    for (name, pa), (_, pb) in zip(ref.named_parameters(), twin.named_parameters()):
        assert _rel(pb.grad, pa.grad) < 1e-4, name
    # and it is not float32 itself: the products do go through the split
    assert not torch.equal(yb, ya)


@pytest.mark.parametrize("path", PATHS)
def test_decode_stays_float32_and_packs_follow_weight_updates(path, monkeypatch):
    ref, twin = _pair(path, monkeypatch)
    ref.eval(), twin.eval()
    with torch.no_grad():
        x1 = torch.randn(1, 48)
        assert torch.equal(twin(x1)[0], ref(x1)[0])  # decode: the float32 native kernel in both
    opt_a = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.5)
    x = torch.randn(40, 48)
    for opt, layer in ((opt_a, ref), (opt_b, twin)):
        layer(x)[0].pow(2).sum().backward()
        opt.step()  # in place: bumps the weights' version counters
    with torch.no_grad():
        assert _rel(twin(x)[0], ref(x)[0]) < 1e-4  # re-packed after the update
        twin.w_up.data.mul_(2.0)  # .data writes are invisible to the version counter ...
        ref.w_up.data.mul_(2.0)
        twin.clear_matmul_cache()  # ... hence clear_matmul_cache
        assert _rel(twin(x)[0], ref(x)[0]) < 1e-4


def test_precision_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown matmul_precision"):
        MoE(8, 8, 2, matmul_precision="bf16")
    with pytest.raises(ConfigError, match="backend"):
        MoE(8, 8, 2, matmul_precision="bf16x3", backend="onednn")
    monkeypatch.setattr(x3, "amx_available", lambda: False)
    with pytest.raises(ConfigError, match="AMX"):
        MoE(8, 8, 2, matmul_precision="bf16x3")


def test_non_float32_layer_is_refused_at_call(monkeypatch):
    monkeypatch.setattr(x3, "amx_available", lambda: True)
    layer = MoE(8, 8, 2, matmul_precision="bf16x3", dtype=torch.float64)
    layer._bf16x3 = Bf16x3Matmul(path="scalar")
    with pytest.raises(ConfigError, match="float32"):
        layer(torch.randn(5, 8, dtype=torch.float64))
