"""Native prefill attention (csrc/prefill_attention*, ``sparseforge::prefill_attention``): every ISA
against the scalar reference and a float64 masked-softmax oracle whose mask is built here from the
pattern's definition; torch SDPA with that mask (and ``is_causal=True`` for the dense pattern);
lengths not divisible by the 64-token block, GQA, float32 / bfloat16 caches (bfloat16 widened to
float32 here; the bf16 compute paths are tested in test_attention_prefill_bf16.py), queries that are
only the last part of the cache, any pattern (property test), thread independence, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.errors import ConfigError, DataError
from sparseforge.ops.prefill_attention import dense_pattern, prefill_attention, prefill_attention_ref

N = kernels.native()
ISAS = [i for i in kernels.ISAS if kernels.cpu_supports(i)]


def _problem(B=1, Hq=4, Hkv=2, Tq=203, n=203, cap=None, D=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cap = cap or n
    q = torch.randn(B, Hq, Tq, D, generator=g)
    k = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    return q, k, v


def _allowed(Tq, n, sinks, window, last, horizon):
    """bool (Tq, n): query row r (position n - Tq + r) may attend to key j, straight from the definition."""
    i = torch.arange(n - Tq, n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    return (j <= i) & (i - j < horizon) & ((j < sinks) | (i - j < window) | (i >= n - last))


def _oracle(q, k, v, n, scale, **pattern):
    """float64 masked softmax attention, GQA by repeating KV heads -> (B, Tq, Hq, D)."""
    B, Hq, Tq, D = q.shape
    G = Hq // k.shape[1]
    kk = k[:, :, :n].double().repeat_interleave(G, 1)
    vv = v[:, :, :n].double().repeat_interleave(G, 1)
    s = torch.einsum("bhqd,bhtd->bhqt", q.double(), kk) * scale
    s = s.masked_fill(~_allowed(Tq, n, **pattern), float("-inf"))
    return torch.einsum("bhqt,bhtd->bhqd", s.softmax(-1), vv).transpose(1, 2)


def _sdpa(q, k, v, n, scale, **pattern):
    """torch SDPA with the pattern's boolean mask -> (B, Tq, Hq, D)."""
    G = q.shape[1] // k.shape[1]
    kk = k[:, :, :n].float().repeat_interleave(G, 1)
    vv = v[:, :, :n].float().repeat_interleave(G, 1)
    mask = _allowed(q.shape[2], n, **pattern)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale).transpose(1, 2)


def _native(q, k, v, n, scale, isa="", parallel=True, bf16_path="scalar", **pattern):
    """The kernel on raw buffers; bfloat16 k / v widened to float32 (bf16_path "scalar") unless told
    otherwise (the bf16 compute paths: test_attention_prefill_bf16.py)."""
    B, Hq, Tq, D = q.shape
    out = torch.full((B, Tq, Hq, D), float("nan"))
    view = (lambda t: t.view(torch.uint16).numpy()) if k.dtype == torch.bfloat16 else (lambda t: t.numpy())
    N.prefill_attention(q.numpy(), view(k), view(v), n, scale, pattern["sinks"], pattern["window"], pattern["last"],
                        pattern["horizon"], out.numpy(), isa, parallel, bf16_path)
    return out


TRIANGLE = dict(sinks=5, window=40, last=19, horizon=10 ** 9)
PATTERNS = {"dense": None, "triangle": TRIANGLE, "triangle_sliding": dict(sinks=3, window=20, last=7, horizon=90),
            "band_only": dict(sinks=0, window=64, last=0, horizon=10 ** 9)}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("D,G", [(32, 2), (64, 4), (20, 1)])
def test_every_isa_matches_reference_oracle_and_masked_sdpa(isa, dtype, name, D, G):
    n = 203  # not a multiple of the 64-token block
    q, k, v = _problem(Hq=2 * G, Hkv=2, Tq=n, n=n, D=D, dtype=dtype)
    pattern = PATTERNS[name] or dense_pattern(n)
    scale = D ** -0.5
    got = _native(q, k, v, n, scale, isa, **pattern)
    ref = prefill_attention_ref(q, k, v, n, scale, **pattern)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.double(), _oracle(q, k, v, n, scale, **pattern), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, _sdpa(q, k, v, n, scale, **pattern), rtol=1e-4, atol=1e-5)


def test_the_pattern_is_real():
    """Triangle output differs from dense in the middle rows and equals it in the band-covered and last rows."""
    n = 300
    q, k, v = _problem(Tq=n, n=n)
    dense = prefill_attention(q, k, v, n, 0.3, **dense_pattern(n))
    tri = prefill_attention(q, k, v, n, 0.3, **TRIANGLE)
    covered = TRIANGLE["window"] + TRIANGLE["sinks"]  # rows whose every key is a sink or in the band
    torch.testing.assert_close(tri[:, :covered], dense[:, :covered], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri[:, n - TRIANGLE["last"]:], dense[:, n - TRIANGLE["last"]:], rtol=1e-5, atol=1e-6)
    assert (tri[:, covered: n - TRIANGLE["last"]] - dense[:, covered: n - TRIANGLE["last"]]).abs().amax() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_equals_causal_sdpa(dtype, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_BF16_PATH", "scalar")  # bfloat16 k / v widened to float32
    n, D = 333, 64
    q, k, v = _problem(B=2, Hq=8, Hkv=2, Tq=n, n=n, D=D, dtype=dtype)
    got = prefill_attention(q, k, v, n, D ** -0.5, **dense_pattern(n))
    want = F.scaled_dot_product_attention(q, k.float(), v.float(), is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_queries_at_the_end_of_a_larger_cache(isa):
    """A later prefill chunk: Tq queries over n cached tokens in a buffer of cap >= n."""
    n, Tq, cap = 250, 71, 320
    q, k, v = _problem(Tq=Tq, n=n, cap=cap, D=16)
    for pattern in (dense_pattern(n), TRIANGLE):
        got = _native(q, k, v, n, 0.25, isa, **pattern)
        torch.testing.assert_close(got.double(), _oracle(q, k, v, n, 0.25, **pattern), rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n=st.integers(1, 260), extra=st.integers(0, 40), sinks=st.integers(0, 80),
       window=st.integers(1, 300), last=st.integers(0, 300), horizon=st.integers(1, 400), G=st.sampled_from([1, 3]),
       isa=st.sampled_from(ISAS), tq_frac=st.floats(0.01, 1.0))
def test_any_pattern_matches_the_oracle(seed, n, extra, sinks, window, last, horizon, G, isa, tq_frac):
    Tq = max(1, int(n * tq_frac))
    q, k, v = _problem(Hq=G, Hkv=1, Tq=Tq, n=n, cap=n + extra, D=24, seed=seed)
    pattern = dict(sinks=sinks, window=window, last=last, horizon=horizon)
    got = _native(q, k, v, n, 0.2, isa, **pattern)
    torch.testing.assert_close(got.double(), _oracle(q, k, v, n, 0.2, **pattern), rtol=1e-4, atol=1e-5)


def test_results_do_not_depend_on_the_thread_pool():
    n = 200
    q, k, v = _problem(Hq=6, Hkv=3, Tq=n, n=n)
    a = _native(q, k, v, n, 0.2, parallel=True, **TRIANGLE)
    b = _native(q, k, v, n, 0.2, parallel=False, **TRIANGLE)
    assert torch.equal(a, b)


def test_nan_in_a_query_propagates_to_its_row_only():
    n = 130
    q, k, v = _problem(Tq=n, n=n, Hq=2, Hkv=1)
    q[0, 1, 100, 3] = float("nan")
    out = prefill_attention(q, k, v, n, 0.2, **dense_pattern(n))
    assert out[0, 100, 1].isnan().all() and not out[0, :, 0].isnan().any() and not out[0, :100, 1].isnan().any()


def test_fake_impl_gives_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(1, 4, 10, 8), torch.empty(1, 2, 16, 8), torch.empty(1, 2, 16, 8)
        out = torch.ops.sparseforge.prefill_attention(q, k, v, 12, 0.3, 0, 12, 0, 12)
    assert out.shape == (1, 10, 4, 8)


@pytest.mark.parametrize("change,match", [
    (dict(n=5), "query tokens"), (dict(n=40), "cache capacity"), (dict(window=0), "window >= 1"),
    (dict(sinks=-1), "sinks >= 0"), (dict(horizon=0), "horizon >= 1"), (dict(q_dtype=torch.float64), "q must be float32"),
    (dict(hkv=3), "does not fit"), (dict(k_dtype=torch.float16), "float32 or bfloat16"),
])
def test_bad_arguments_are_clear_errors(change, match):
    q = torch.randn(1, 4, 10, 8).to(change.get("q_dtype", torch.float32))
    k = torch.randn(1, change.get("hkv", 2), 32, 8).to(change.get("k_dtype", torch.float32))
    args = dict(n=20, sinks=0, window=20, last=0, horizon=20)
    args.update({key: val for key, val in change.items() if key in args})
    with pytest.raises(DataError, match=match):
        prefill_attention(q, k, k.clone(), args["n"], 0.3, args["sinks"], args["window"], args["last"], args["horizon"])


def test_unknown_isa_is_a_config_error(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", "sse9")
    q, k, v = _problem(Tq=8, n=8, D=8)
    with pytest.raises(ConfigError):
        prefill_attention(q, k, v, 8, 0.3, **dense_pattern(8))
