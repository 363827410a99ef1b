"""The decode-layer glue (``csrc/decode_glue.h``, :mod:`sparseforge.ops.decode_glue`) on every kernel path against
its scalar oracle and Llama's torch arithmetic: RMSNorm with and without the residual add, SwiGLU (tails,
extreme values, NaN / inf), the rotary embedding with its KV write (bitwise the model's formula), the bound calls,
and the one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.errors import DataError
from sparseforge.ops.decode_glue import (bind_rms_norm, bind_rope_kv, bind_swiglu, bind_to_bf16, rms_norm, rms_norm_ref,
                                         rope_kv_, swiglu, swiglu_ref, to_bf16)


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    if not kernels.cpu_supports(request.param):
        pytest.skip(f"CPU lacks {request.param}")
    return request.param


def _torch_rms(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's float32 arithmetic."""
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("rows,n", [(1, 1), (1, 7), (3, 33), (1, 2048), (2, 2053)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_oracle_and_llamas_formula(isa, rows, n, with_residual):
    g = torch.Generator().manual_seed(rows * n)
    h, w = torch.randn(rows, n, generator=g) * 3, torch.randn(n, generator=g)
    res = torch.randn(rows, n, generator=g) if with_residual else None
    got_h, ref_h = h.clone(), h.clone()
    got = rms_norm(got_h, w, 1e-5, residual=res, isa=isa)
    ref = rms_norm_ref(ref_h, w, 1e-5, residual=res)
    summed = h + res if with_residual else h
    assert torch.equal(got_h, summed) and torch.equal(ref_h, summed)  # h += residual, in place, exactly
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(got, _torch_rms(summed, w, 1e-5), rtol=2e-6, atol=1e-7)


def test_rms_norm_into_h_itself_and_with_eps_zero():
    h, w = torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, -2.0])
    out = rms_norm(h, w, 0.0, out=h)
    assert out is h
    torch.testing.assert_close(h, torch.tensor([[3.0, -8.0]]) / (12.5 ** 0.5))


def test_rms_norm_propagates_nan_and_inf(isa):
    h = torch.randn(2, 40)
    h[0, 3] = float("nan")
    h[1, 5] = float("inf")
    out = rms_norm(h.clone(), torch.ones(40), 1e-6, isa=isa)
    assert out[0].isnan().all()  # the NaN reaches the row's sum of squares
    assert out[1].isnan().sum() == 1 and (out[1] == 0).sum() == 39  # inf / inf at its column, x / inf elsewhere


@pytest.mark.parametrize("rows,f", [(1, 1), (1, 5), (2, 17), (1, 5632), (3, 1003)])
def test_swiglu_matches_the_oracle_and_torch(isa, rows, f):
    g = torch.Generator().manual_seed(rows + f)
    gate_up = torch.randn(rows, 2 * f, generator=g) * 6
    got = swiglu(gate_up, isa=isa)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(got, swiglu_ref(gate_up), rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=2e-6, atol=1e-30)


def test_swiglu_at_extremes_follows_torch(isa):
    gate = torch.tensor([[0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0, 1e4, -1e4, float("inf"), float("-inf"),
                          float("nan"), 3.0, -3.0, 0.5]])
    up = torch.tensor([[1.0] * 13 + [float("inf"), 0.0, float("nan")]])
    got = swiglu(torch.cat([gate, up], dim=1), isa=isa)
    expected = F.silu(gate) * up
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(got[finite], expected[finite], rtol=2e-6, atol=1e-35)  # e^-88: 0 against 5e-37


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 3), n=st.integers(1, 300), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31))
def test_rms_norm_and_swiglu_property(rows, n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    h, w, res = (torch.randn(rows, n, generator=g) * scale for _ in range(3))
    out = rms_norm(h.clone(), w[0].contiguous(), 1e-6, residual=res)
    torch.testing.assert_close(out, _torch_rms(h + res, w[0], 1e-6), rtol=4e-6, atol=1e-6 * scale)
    gate_up = torch.randn(rows, 2 * n, generator=g) * min(scale, 50.0)
    torch.testing.assert_close(swiglu(gate_up), swiglu_ref(gate_up), rtol=2e-6, atol=1e-30)


def _rope_case(heads=4, kv_heads=2, d=8, cap=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(1, (heads + 2 * kv_heads) * d, generator=g)
    cos, sin = torch.randn(cap, d, generator=g), torch.randn(cap, d, generator=g)
    half = d // 2
    ssin = torch.cat([-sin[:, :half], sin[:, half:]], dim=1).contiguous()
    q = torch.empty(1, heads, d)
    k, v = torch.zeros(1, kv_heads, cap, d), torch.zeros(1, kv_heads, cap, d)
    return qkv, cos, sin, ssin, q, k, v


def test_rope_kv_is_the_models_rotary_bitwise_and_writes_one_position():
    heads, kv_heads, d, cap, pos = 4, 2, 8, 5, 3
    qkv, cos, sin, ssin, q, k, v = _rope_case(heads, kv_heads, d, cap)
    rope_kv_(qkv, cos, ssin, heads, q, k, v, pos)

    def rotate_half(x):
        return torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)

    qr = qkv[0, :heads * d].view(heads, d)
    kr = qkv[0, heads * d:(heads + kv_heads) * d].view(kv_heads, d)
    vr = qkv[0, (heads + kv_heads) * d:].view(kv_heads, d)
    assert torch.equal(q[0], qr * cos[pos] + rotate_half(qr) * sin[pos])
    assert torch.equal(k[0, :, pos], kr * cos[pos] + rotate_half(kr) * sin[pos])
    assert torch.equal(v[0, :, pos], vr)
    others = [t for t in range(cap) if t != pos]
    assert not k[0, :, others].any() and not v[0, :, others].any()


def test_bound_calls_follow_their_buffers():
    h, w, out, res = torch.randn(1, 16), torch.randn(16), torch.empty(1, 16), torch.randn(1, 16)
    norm = bind_rms_norm(h, w, 1e-5, out, residual=res)
    for _ in range(2):
        before = h.clone()
        norm()
        torch.testing.assert_close(out, _torch_rms(before + res, w, 1e-5), rtol=2e-6, atol=1e-7)
    gate_up, act = torch.randn(1, 10), torch.empty(1, 5)
    call = bind_swiglu(gate_up, act)
    gate_up.mul_(2)
    call()
    torch.testing.assert_close(act, swiglu_ref(gate_up))
    qkv, cos, sin, ssin, q, k, v = _rope_case()
    rope = bind_rope_kv(qkv, cos, ssin, 4, q, k, v)
    for pos in (0, 4):
        rope(pos)
        assert torch.equal(v[0, :, pos], qkv[0, 6 * 8:].view(2, 8))


def test_bad_input_gets_one_line_errors():
    h, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(DataError, match="h must be a contiguous 2-D float32"):
        rms_norm(h.double(), w, 1e-5)
    with pytest.raises(DataError, match="weight must have h's 8 columns"):
        rms_norm(h, torch.randn(7), 1e-5)
    with pytest.raises(DataError, match=r"residual must be \(2, 8\)"):
        rms_norm(h, w, 1e-5, residual=torch.randn(1, 8))
    with pytest.raises(DataError, match="residual must not be h or out"):
        rms_norm(h, w, 1e-5, residual=h)
    with pytest.raises(DataError, match="eps must be >= 0"):
        rms_norm(h, w, -1.0)
    with pytest.raises(DataError, match="gate_up must have an even number of columns"):
        swiglu(torch.randn(1, 7))
    with pytest.raises(DataError, match="'sse9' is not a kernel path"):
        swiglu(torch.randn(1, 8), isa="sse9")
    qkv, cos, sin, ssin, q, k, v = _rope_case()
    with pytest.raises(DataError, match=r"qkv must be \(1, 64\)"):
        rope_kv_(qkv[:, :60].contiguous(), cos, ssin, 4, q, k, v, 0)
    with pytest.raises(DataError, match="outside the cache"):
        rope_kv_(qkv, cos, ssin, 4, q, k, v, 5)
    with pytest.raises(DataError, match=r"cos must be \(5, 8\)"):
        rope_kv_(qkv, cos[:4].contiguous(), ssin, 4, q, k, v, 0)


# ---- bfloat16: the model's rounding points -------------------------------------------------------------------


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 steps between two bfloat16 tensors of finite values with the same signs."""
    ai, bi = a.view(torch.int16).int(), b.view(torch.int16).int()
    return int((ai - bi).abs().max())


@pytest.mark.parametrize("n", [1, 9, 2048, 2053])
@pytest.mark.parametrize("with_residual", [False, True])
def test_bf16_rms_norm_rounds_where_the_model_rounds(isa, n, with_residual):
    g = torch.Generator().manual_seed(n)
    h, w = (torch.randn(2, n, generator=g) * 3).bfloat16(), torch.randn(n, generator=g).bfloat16()
    res = torch.randn(2, n, generator=g).bfloat16() if with_residual else None
    got_h, ref_h = h.clone(), h.clone()
    got = rms_norm(got_h, w, 1e-5, residual=res, isa=isa)
    ref = rms_norm_ref(ref_h, w, 1e-5, residual=res)
    summed = h + res if with_residual else h  # rounded once, as the model's residual add
    assert torch.equal(got_h, summed) and torch.equal(ref_h, summed)
    f = summed.float()
    model = w * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)  # LlamaRMSNorm in bf16
    assert got.dtype == torch.bfloat16
    assert _bf16_ulps(got, ref) <= 1 and _bf16_ulps(got, model) <= 1  # r differs in its last float32 bits at most
    assert (got == model).float().mean() >= 0.99


@pytest.mark.parametrize("f", [1, 7, 5632])
def test_bf16_swiglu_rounds_where_the_model_rounds(isa, f):
    g = torch.Generator().manual_seed(f)
    gate_up = (torch.randn(2, 2 * f, generator=g) * 4).bfloat16()
    got = swiglu(gate_up, isa=isa)
    gate, up = gate_up.chunk(2, dim=-1)
    model = F.silu(gate) * up  # bf16 silu (float inside, rounded), then a rounded product
    assert got.dtype == torch.bfloat16
    assert _bf16_ulps(got, swiglu_ref(gate_up)) <= 1 and _bf16_ulps(got, model) <= 1
    assert (got == model).float().mean() >= 0.99


def test_bf16_rope_kv_is_the_models_bf16_rotary_bitwise():
    heads, kv_heads, d, cap, pos = 4, 2, 8, 5, 2
    qkv, cos, sin, ssin, _, _, _ = _rope_case(heads, kv_heads, d, cap, seed=3)
    qkv, cos, sin, ssin = (t.bfloat16() for t in (qkv, cos, sin, ssin))
    q = torch.empty(1, heads, d)
    k, v = torch.zeros(1, kv_heads, cap, d, dtype=torch.bfloat16), torch.zeros(1, kv_heads, cap, d, dtype=torch.bfloat16)
    rope_kv_(qkv, cos, ssin, heads, q, k, v, pos)

    def rotate_half(x):
        return torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)

    qr = qkv[0, :heads * d].view(heads, d)
    kr = qkv[0, heads * d:(heads + kv_heads) * d].view(kv_heads, d)
    assert torch.equal(q[0], (qr * cos[pos] + rotate_half(qr) * sin[pos]).float())
    assert torch.equal(k[0, :, pos], kr * cos[pos] + rotate_half(kr) * sin[pos])
    assert torch.equal(v[0, :, pos], qkv[0, (heads + kv_heads) * d:].view(kv_heads, d))


def test_to_bf16_rounds_as_torch_and_keeps_nan_and_inf():
    src = torch.cat([torch.randn(1000) * 1e3, torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                                                            1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38])])
    got = to_bf16(src)
    expected = src.to(torch.bfloat16)
    assert torch.equal(got.isnan(), expected.isnan())
    ok = ~expected.isnan()
    assert torch.equal(got[ok].view(torch.int16), expected[ok].view(torch.int16))
    out = torch.empty(1008, dtype=torch.bfloat16)
    call = bind_to_bf16(src, out)
    src.mul_(2)
    call()
    assert torch.equal(out[ok].view(torch.int16), src.to(torch.bfloat16)[ok].view(torch.int16))


def test_mixed_dtypes_are_refused():
    h = torch.randn(1, 8).bfloat16()
    with pytest.raises(DataError, match="weight must have h's dtype"):
        rms_norm(h, torch.randn(8), 1e-5)
    with pytest.raises(DataError, match="out must be a contiguous 2-D bfloat16"):
        to_bf16(torch.randn(1, 8), out=torch.empty(1, 8))
    qkv, cos, sin, ssin, q, k, v = _rope_case()
    with pytest.raises(DataError, match="k must be a contiguous 4-D bfloat16"):
        rope_kv_(qkv.bfloat16(), cos.bfloat16(), ssin.bfloat16(), 4, q, k, v, 0)
