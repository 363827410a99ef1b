"""Mustafar's compressed-KV decode kernel (``sparseforge::sparse_kv_attention``) with the dense recent
window in the same call: every ISA (and the AVX-512 bfloat16 path with and without VBMI2's vpexpandw)
against the scalar reference and a float64 oracle on the pruned keys and values, GQA groups, window
edges, thread counts, the policy's decode step against SDPA, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.errors import DataError
from sparseforge.ops.sparse_kv import attend_compressed, compress_tokens, sparse_kv_attention, sparse_kv_attention_ref

ISAS = [i for i in kernels.ISAS if kernels.cpu_supports(i)]


def _has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        return flag in f.read().split()


# the AVX-512 bfloat16 walk: vpexpandw (word order) where the CPU has VBMI2, and the plain vexpandps walk
VBMI2 = ["1", "0"] if "avx512" in ISAS and _has("avx512_vbmi2") else ["0"]


def _problem(B, Hkv, G, D, cap, keep, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=g) * 2  # (B, Hq, D)
    k = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)  # (B, Hkv, cap, D)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    return q, k, v, compress_tokens(k, keep), compress_tokens(v, keep)


def _pruned(x, keep):
    """x with all but each token's ``keep`` largest magnitudes zeroed, float64."""
    idx = x.double().abs().topk(keep, dim=-1).indices
    return torch.zeros(x.shape, dtype=torch.float64).scatter(-1, idx, x.double().gather(-1, idx))


def _oracle(q, k, v, n, end, keep, scale):
    """float64 attention over tokens [0, n) pruned to ``keep`` channels and [n, end) dense (GQA by repetition)."""
    G = q.shape[1] // k.shape[1]
    kk = torch.cat([_pruned(k[:, :, :n], keep), k[:, :, n:end].double()], 2).repeat_interleave(G, 1)
    vv = torch.cat([_pruned(v[:, :, :n], keep), v[:, :, n:end].double()], 2).repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhtd->bht", q.double(), kk) * scale
    return torch.einsum("bht,bhtd->bhd", s.softmax(-1), vv), s.logsumexp(-1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vbmi2", VBMI2)
# GQA groups 1, 4 (the Llama-3.2-1B shape), 5 and 8; D = 64 (one bitmap word), 128 (two), 96 and 13;
# dense windows: none, one token, one chunk, several chunks (> 512)
@pytest.mark.parametrize("G,D,keep,n,end", [(4, 64, 21, 300, 556), (1, 64, 21, 129, 130), (8, 64, 20, 70, 70),
                                            (5, 96, 30, 200, 715), (4, 128, 40, 64, 300), (3, 13, 5, 90, 100)])
def test_compressed_and_recent_match_reference_and_oracle(isa, dtype, vbmi2, G, D, keep, n, end, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    monkeypatch.setenv("SPARSEFORGE_VBMI2", vbmi2)
    B, Hkv, cap = 2, 2, 720
    q, k, v, (kv, kb), (vv, vb) = _problem(B, Hkv, G, D, cap, keep, dtype, seed=G * D + n)
    out, lse = sparse_kv_attention(q, kv, kb, vv, vb, n, 0.2, k, v, end)
    ref_out, ref_lse = sparse_kv_attention_ref(q, kv, kb, vv, vb, n, 0.2, k, v, end)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    want, want_lse = _oracle(q, k, v, n, end, keep, 0.2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    eager = attend_compressed(q, kv, kb, vv, vb, n, 0.2, k, v, end)  # the decode step's call: the same kernel
    assert torch.equal(eager[0], out) and torch.equal(eager[1], lse)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 700), recent=st.integers(0, 600), G=st.sampled_from([1, 2, 4, 8]),
       keep=st.integers(1, 64), dtype=st.sampled_from([torch.float32, torch.bfloat16]), isa=st.sampled_from(ISAS))
def test_any_split_matches_the_oracle(seed, n, recent, G, keep, dtype, isa):
    """Any compressed count, window length, group and keep: the kernel is attention over the pruned
    tokens followed by the dense ones (the D = 64 direct path and its 64-token block edges included)."""
    import os

    before = os.environ.get("SPARSEFORGE_ISA")  # hypothesis runs many examples per test: no monkeypatch
    os.environ["SPARSEFORGE_ISA"] = isa
    try:
        q, k, v, (kv, kb), (vv, vb) = _problem(1, 2, G, 64, n + recent, keep, dtype, seed)
        out, lse = attend_compressed(q, kv, kb, vv, vb, n, 0.3, k, v, n + recent)
    finally:
        if before is None:
            del os.environ["SPARSEFORGE_ISA"]
        else:
            os.environ["SPARSEFORGE_ISA"] = before
    want, want_lse = _oracle(q, k, v, n, n + recent, keep, 0.3)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_and_chunks_give_bitwise_equal_results(dtype):
    """Chunk partials are merged in chunk order: one thread or two, the pool or the calling thread alone."""
    q, k, v, (kv, kb), (vv, vb) = _problem(1, 8, 4, 64, 5000, 21, dtype, seed=1)
    N = kernels.native()
    view = (lambda t: t.view(torch.uint16).numpy()) if dtype == torch.bfloat16 else (lambda t: t.numpy())
    before = kernels.num_threads()
    results = []
    try:
        for threads, parallel in ((1, True), (2, True), (2, False)):
            kernels.set_num_threads(threads)
            out, lse = torch.empty(q.shape), torch.empty(q.shape[:2])
            N.sparse_kv_attention(q.numpy(), view(kv), kb.numpy(), view(vv), vb.numpy(), 4600, 0.125, out.numpy(),
                                  lse.numpy(), "", 0, parallel, k=view(k), v=view(v), recent_start=4600, recent_end=5000)
            results.append((out, lse))
    finally:
        kernels.set_num_threads(before)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mustafar_decode_equals_sdpa_on_the_pruned_cache(dtype):
    """The policy's step (one native call) is SDPA over the pruned old tokens and the dense recent ones."""
    from sparseforge.attention import Dense, Mustafar, PagedKVCache
    from sparseforge.attention.policies import dense_spans

    g = torch.Generator().manual_seed(3)
    n, Hkv, G, D = 1300, 2, 4, 64
    cache = PagedKVCache(num_layers=1, page_size=16, max_cache_len=n, policy=Dense())
    k, v = torch.randn(1, Hkv, n, D, generator=g).to(dtype), torch.randn(1, Hkv, n, D, generator=g).to(dtype)
    cache.update(k, v, 0)
    layer, q, policy = cache.layers[0], torch.randn(1, Hkv * G, D, generator=g), Mustafar(0.7, recent=256)
    out = policy.decode(layer, q, dense_spans(1, Hkv, n), 0.125)
    done = (n - 256) // 256 * 256  # whole 256-token chunks older than the window
    keep = policy.keep(D)[0]
    kk = torch.cat([_pruned(k[:, :, :done], keep), k[:, :, done:].double()], 2)
    vv = torch.cat([_pruned(v[:, :, :done], keep), v[:, :, done:].double()], 2)
    want = F.scaled_dot_product_attention(q.double().unsqueeze(2), kk, vv, scale=0.125, enable_gqa=True).squeeze(2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_dense_window_arguments():
    q, k, v, (kv, kb), (vv, vb) = _problem(1, 1, 2, 16, 40, 4, torch.float32, seed=0)
    with pytest.raises(DataError, match="both k and v"):
        sparse_kv_attention(q, kv, kb, vv, vb, 20, 0.2, k, None, 30)
    with pytest.raises(DataError, match=r"\[n, end\) must lie in \[20, 40\]"):
        sparse_kv_attention(q, kv, kb, vv, vb, 20, 0.2, k, v, 41)
    with pytest.raises(DataError, match=r"\[n, end\) must lie in \[20, 40\]"):
        sparse_kv_attention(q, kv, kb, vv, vb, 20, 0.2, k, v, 19)
    with pytest.raises(DataError, match="kvals' dtype"):
        sparse_kv_attention(q, kv, kb, vv, vb, 20, 0.2, k.bfloat16(), v.bfloat16(), 30)
    with pytest.raises(DataError, match="must both be"):
        sparse_kv_attention(q, kv, kb, vv, vb, 20, 0.2, k[:, :, :, :8].contiguous(), v[:, :, :, :8].contiguous(), 30)
