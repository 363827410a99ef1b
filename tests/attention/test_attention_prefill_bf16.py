"""bf16 compute in the native prefill attention (csrc/prefill_attention_bf16_kernels.h: AMX-BF16 tiles
and AVX512-BF16 vdpbf16ps over bfloat16 K/V, float32 softmax): every path this CPU runs against the
scalar float32 reference on the same bf16 inputs, a float64 masked-softmax oracle and torch's bf16
SDPA, with bf16 tolerances (the queries and the probabilities are rounded to bf16); GQA, odd lengths
and head sizes, causal, sliding window, TriangleMix patterns (property test), later chunks, NaN,
scale signs, thread independence; the path choice (SPARSEFORGE_BF16_PATH, SPARSEFORGE_ISA) and its
errors. Paths this CPU lacks must raise ConfigError."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.errors import ConfigError
from sparseforge.ops.prefill_attention import bf16_compute_path, dense_pattern, prefill_attention

N = kernels.native()
BF16_PATHS = ["avx512_bf16", "amx"]
RUNNABLE = [p for p in BF16_PATHS if N.bf16_path_supported(p)]
# bf16 rounding of q and of the probabilities: ~2^-9 relative per term
ATOL, RTOL = 8e-3, 2e-2


def _problem(B=1, Hq=4, Hkv=2, Tq=203, n=203, cap=None, D=64, seed=0):
    """q float32 holding bf16 values (the queries of a bf16 model); k, v bfloat16."""
    g = torch.Generator().manual_seed(seed)
    cap = cap or n
    q = torch.randn(B, Hq, Tq, D, generator=g).bfloat16().float()
    k = torch.randn(B, Hkv, cap, D, generator=g).bfloat16()
    v = torch.randn(B, Hkv, cap, D, generator=g).bfloat16()
    return q, k, v


def _native(q, k, v, n, scale, path, parallel=True, **pattern):
    B, Hq, Tq, D = q.shape
    out = torch.full((B, Tq, Hq, D), float("nan"))
    N.prefill_attention(q.numpy(), k.view(torch.uint16).numpy(), v.view(torch.uint16).numpy(), n, scale,
                        pattern["sinks"], pattern["window"], pattern["last"], pattern["horizon"], out.numpy(), "",
                        parallel, path)
    return out


def _allowed(Tq, n, sinks, window, last, horizon):
    i = torch.arange(n - Tq, n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    return (j <= i) & (i - j < horizon) & ((j < sinks) | (i - j < window) | (i >= n - last))


def _oracle(q, k, v, n, scale, **pattern):
    """float64 masked softmax over the same bf16 values -> (B, Tq, Hq, D)."""
    G = q.shape[1] // k.shape[1]
    kk = k[:, :, :n].double().repeat_interleave(G, 1)
    vv = v[:, :, :n].double().repeat_interleave(G, 1)
    s = torch.einsum("bhqd,bhtd->bhqt", q.double(), kk) * scale
    s = s.masked_fill(~_allowed(q.shape[2], n, **pattern), float("-inf"))
    return torch.einsum("bhqt,bhtd->bhqd", s.softmax(-1), vv).transpose(1, 2)


def _sdpa_bf16(q, k, v, n, scale, **pattern):
    """torch's bf16 SDPA with the pattern's mask -> (B, Tq, Hq, D) float32."""
    G = q.shape[1] // k.shape[1]
    mask = _allowed(q.shape[2], n, **pattern)
    kk, vv = k[:, :, :n].repeat_interleave(G, 1), v[:, :, :n].repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(q.bfloat16(), kk, vv, attn_mask=mask, scale=scale).transpose(1, 2).float()


PATTERNS = {"dense": None, "triangle": dict(sinks=5, window=40, last=19, horizon=10 ** 9),
            "triangle_sliding": dict(sinks=3, window=20, last=7, horizon=90),
            "band_only": dict(sinks=0, window=64, last=0, horizon=10 ** 9)}


@pytest.fixture(params=BF16_PATHS)
def path(request):
    """A bf16 compute path this CPU runs; on a CPU without it, the path must refuse with ConfigError."""
    if request.param not in RUNNABLE:
        q, k, v = _problem(Tq=4, n=4, D=8)
        with pytest.raises(ConfigError, match=request.param):
            _native(q, k, v, 4, 0.3, request.param, **dense_pattern(4))
        return "scalar"  # the remaining checks then hold for the float32-compute path
    return request.param


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("D,G", [(64, 4), (20, 1), (80, 3), (128, 2)])
def test_bf16_paths_match_reference_oracle_and_bf16_sdpa(path, name, D, G):
    n = 203  # not a multiple of the 128-key block nor of the 32-key step
    q, k, v = _problem(Hq=2 * G, Hkv=2, Tq=n, n=n, D=D)
    pattern = PATTERNS[name] or dense_pattern(n)
    scale = D ** -0.5
    got = _native(q, k, v, n, scale, path, **pattern)
    ref = _native(q, k, v, n, scale, "scalar", **pattern)  # float32 compute on the same bf16 values
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.double(), _oracle(q, k, v, n, scale, **pattern), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got, _sdpa_bf16(q, k, v, n, scale, **pattern), rtol=RTOL, atol=2 * ATOL)


def test_bf16_dense_equals_causal_sdpa_and_is_closer_than_the_bf16_rounding_bound(path):
    n, D = 333, 64
    q, k, v = _problem(B=2, Hq=8, Hkv=2, Tq=n, n=n, D=D)
    got = _native(q, k, v, n, D ** -0.5, path, **dense_pattern(n))
    want = F.scaled_dot_product_attention(q, k.float(), v.float(), is_causal=True, enable_gqa=True).transpose(1, 2)
    err = (got - want).abs()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert err.mean() < 1e-3  # bf16 probabilities: ~2^-9 relative, averaged over the keys


@pytest.mark.parametrize("pattern", [dense_pattern(250), PATTERNS["triangle"]])
def test_queries_at_the_end_of_a_larger_cache(path, pattern):
    n, Tq, cap = 250, 71, 320
    q, k, v = _problem(Tq=Tq, n=n, cap=cap, D=32)
    k[:, :, n:] = float("nan")  # storage past n is never read
    v[:, :, n:] = float("nan")
    got = _native(q, k, v, n, 0.25, path, **pattern)
    torch.testing.assert_close(got.double(), _oracle(q, k, v, n, 0.25, **pattern), rtol=RTOL, atol=ATOL)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n=st.integers(1, 300), extra=st.integers(0, 40), sinks=st.integers(0, 80),
       window=st.integers(1, 300), last=st.integers(0, 300), horizon=st.integers(1, 400), G=st.sampled_from([1, 3]),
       path=st.sampled_from(RUNNABLE or ["scalar"]), tq_frac=st.floats(0.01, 1.0), D=st.sampled_from([16, 24, 64]))
def test_any_pattern_matches_the_oracle(seed, n, extra, sinks, window, last, horizon, G, path, tq_frac, D):
    Tq = max(1, int(n * tq_frac))
    q, k, v = _problem(Hq=G, Hkv=1, Tq=Tq, n=n, cap=n + extra, D=D, seed=seed)
    pattern = dict(sinks=sinks, window=window, last=last, horizon=horizon)
    got = _native(q, k, v, n, 0.2, path, **pattern)
    torch.testing.assert_close(got.double(), _oracle(q, k, v, n, 0.2, **pattern), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_negative_and_zero_scales(path, scale):
    n = 150
    q, k, v = _problem(Tq=n, n=n, D=32)
    got = _native(q, k, v, n, scale, path, **PATTERNS["triangle"])
    torch.testing.assert_close(got.double(), _oracle(q, k, v, n, scale, **PATTERNS["triangle"]), rtol=RTOL, atol=ATOL)


def test_results_do_not_depend_on_the_thread_pool(path):
    n = 700
    q, k, v = _problem(Hq=6, Hkv=3, Tq=n, n=n)
    a = _native(q, k, v, n, 0.2, path, parallel=True, **PATTERNS["triangle"])
    b = _native(q, k, v, n, 0.2, path, parallel=False, **PATTERNS["triangle"])
    assert torch.equal(a, b)


def test_nan_in_a_query_propagates_to_its_row_only(path):
    n = 130
    q, k, v = _problem(Tq=n, n=n, Hq=2, Hkv=1)
    q[0, 1, 100, 3] = float("nan")
    out = _native(q, k, v, n, 0.2, path, **dense_pattern(n))
    assert out[0, 100, 1].isnan().all() and not out[0, :, 0].isnan().any() and not out[0, :100, 1].isnan().any()
    assert not out[0, 101:, 1].isnan().any()


def test_the_op_follows_the_bf16_path_setting(monkeypatch):
    """SPARSEFORGE_BF16_PATH picks the path of the registered op; scalar equals the float32 kernel."""
    n = 257
    q, k, v = _problem(Tq=n, n=n)
    monkeypatch.setenv("SPARSEFORGE_BF16_PATH", "scalar")
    assert bf16_compute_path() == "scalar"
    widened = prefill_attention(q, k, v, n, 0.125, **dense_pattern(n))
    torch.testing.assert_close(widened, prefill_attention(q, k.float(), v.float(), n, 0.125, **dense_pattern(n)),
                               rtol=1e-5, atol=1e-6)
    for p in RUNNABLE:
        monkeypatch.setenv("SPARSEFORGE_BF16_PATH", p)
        assert bf16_compute_path() == p
        got = prefill_attention(q, k, v, n, 0.125, **dense_pattern(n))
        assert torch.equal(got, _native(q, k, v, n, 0.125, p, **dense_pattern(n)))
        assert not torch.equal(got, widened)  # bf16 probabilities: not the float32 result bit for bit


def test_auto_picks_the_best_path_and_a_lower_isa_means_float32(monkeypatch):
    monkeypatch.delenv("SPARSEFORGE_BF16_PATH", raising=False)
    assert bf16_compute_path() == ("amx" if "amx" in RUNNABLE else "scalar")  # avx512_bf16 only when named
    assert N.prefill_bf16_path("avx2", "") == "scalar" and N.prefill_bf16_path("scalar", "auto") == "scalar"
    monkeypatch.setenv("SPARSEFORGE_ISA", "avx2")
    assert bf16_compute_path() == "scalar"


def test_unknown_path_is_a_config_error(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_BF16_PATH", "tpu")
    with pytest.raises(ConfigError, match="SPARSEFORGE_BF16_PATH"):
        bf16_compute_path()
    q, k, v = _problem(Tq=8, n=8, D=8)
    with pytest.raises(ConfigError, match="not a bf16 kernel path"):
        prefill_attention(q, k, v, 8, 0.3, **dense_pattern(8))
