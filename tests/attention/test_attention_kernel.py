"""Native decode attention (csrc/decode_attention*, ``sparseforge::decode_attention``): every ISA
against the scalar reference and a float64 masked-softmax oracle, GQA groups, float32 / bfloat16
caches, arbitrary spans (property test), chunk and thread independence, dense == torch SDPA, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.errors import ConfigError, DataError
from sparseforge.ops.decode_attention import decode_attention, decode_attention_ref

N = kernels.native()
ISAS = [i for i in kernels.ISAS if kernels.cpu_supports(i)]


def _problem(B=1, Hq=8, Hkv=2, D=64, cap=300, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g) * 2
    k = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    return q, k, v


def _spans(B, Hkv, pairs):
    """The same [start, length) list for every (b, KV head) -> int32 (B, Hkv, S, 2)."""
    return torch.tensor(pairs, dtype=torch.int32).view(1, 1, -1, 2).expand(B, Hkv, -1, -1).contiguous()


def _oracle(q, k, v, spans, scale):
    """float64 softmax attention over the selected tokens, GQA by repeating KV heads."""
    B, Hq, D = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    G = Hq // Hkv
    mask = torch.zeros(B, Hkv, cap, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            for start, length in spans[b, h].tolist():
                mask[b, h, start:start + length] = True
    kk = k.double().repeat_interleave(G, 1)  # (B, Hq, cap, D)
    vv = v.double().repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhtd->bht", q.double(), kk) * scale
    s = s.masked_fill(~mask.repeat_interleave(G, 1), float("-inf"))
    return torch.einsum("bht,bhtd->bhd", s.softmax(-1), vv)


def _native(q, k, v, spans, n, scale, isa="", chunk=0, parallel=True):
    out = torch.full(q.shape, float("nan"))
    view = (lambda t: t.view(torch.uint16).numpy()) if k.dtype == torch.bfloat16 else (lambda t: t.numpy())
    N.decode_attention(q.numpy(), view(k), view(v), spans.numpy(), n, scale, out.numpy(), isa, chunk, parallel)
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (64, 4k): the AVX-512 broadcast score path (four query rows per pass); (96, 5), (128, 1): value tiles
# of 4, 2 and 1 vectors; (13, 3), (8, 7): scalar tails
@pytest.mark.parametrize("D,G", [(64, 4), (64, 8), (64, 16), (96, 5), (128, 1), (13, 3), (8, 7)])
def test_every_isa_matches_reference_and_oracle(isa, dtype, D, G):
    B, Hkv, cap = 2, 2, 300
    q, k, v = _problem(B, Hkv * G, Hkv, D, cap, dtype=dtype)
    spans = _spans(B, Hkv, [[0, 4], [40, 77], [150, 16], [290, 7]])
    scale = D ** -0.5
    got = _native(q, k, v, spans, 297, scale, isa, chunk=37)
    ref = decode_attention_ref(q, k, v, spans, 297, scale)
    want = _oracle(q, k, v, spans, scale)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 200),
    cuts=st.lists(st.integers(0, 200), min_size=1, max_size=12),
    chunk=st.integers(1, 70),
    G=st.sampled_from([1, 2, 4, 8]),
    D=st.sampled_from([16, 64]),
    isa=st.sampled_from(ISAS),
)
def test_any_spans_match_the_oracle(seed, n, cuts, chunk, G, D, isa):
    """Property: for any ascending disjoint span list (at least one token), kernel == float64 oracle."""
    bounds = sorted({c % (n + 1) for c in cuts} | {0, n})
    pairs = [[a, b - a] for a, b in zip(bounds[:-1:2], bounds[1::2])]  # every other interval
    pairs = [p for p in pairs if p[1] > 0] or [[0, n]]
    q, k, v = _problem(1, 2 * G, 2, D, 200, seed)
    spans = _spans(1, 2, pairs)
    got = _native(q, k, v, spans, n, 0.3, isa, chunk)
    torch.testing.assert_close(got.double(), _oracle(q, k, v, spans, 0.3), rtol=2e-5, atol=2e-5)


def test_different_spans_per_head_and_padding_slots():
    q, k, v = _problem(2, 4, 2, 32, 100)
    spans = torch.zeros(2, 2, 3, 2, dtype=torch.int32)  # length-0 slots are unused
    spans[0, 0, 0] = torch.tensor([0, 100])
    spans[0, 1, 1] = torch.tensor([10, 5])
    spans[1, 0, :2] = torch.tensor([[0, 1], [99, 1]])
    spans[1, 1, 2] = torch.tensor([50, 50])
    got = decode_attention(q, k, v, spans, 100, 0.2)
    torch.testing.assert_close(got.double(), _oracle(q, k, v, spans, 0.2), rtol=1e-5, atol=1e-5)


def test_chunks_and_threads_give_bitwise_equal_results():
    q, k, v = _problem(1, 8, 2, 64, 3000)
    spans = _spans(1, 2, [[0, 3000]])
    base = _native(q, k, v, spans, 3000, 0.125, chunk=256, parallel=False)
    torch.testing.assert_close(_native(q, k, v, spans, 3000, 0.125, chunk=256, parallel=True), base, rtol=0, atol=0)
    with kernels.sparse_threads(1):
        torch.testing.assert_close(_native(q, k, v, spans, 3000, 0.125, chunk=256), base, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_spans_equal_torch_sdpa(dtype):
    B, Hq, Hkv, D, n = 2, 32, 8, 64, 1000
    q, k, v = _problem(B, Hq, Hkv, D, n + 24, dtype=dtype)
    spans = _spans(B, Hkv, [[0, n]])
    got = decode_attention(q, k, v, spans, n, D ** -0.5)
    want = F.scaled_dot_product_attention(
        q.unsqueeze(2), k[:, :, :n].float(), v[:, :, :n].float(), enable_gqa=True
    ).squeeze(2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_large_scores_do_not_overflow():
    q, k, v = _problem(1, 2, 1, 16, 64)
    q *= 1000.0  # scores ~ 1e4: exp without the running max would overflow
    spans = _spans(1, 1, [[0, 64]])
    got = decode_attention(q, k, v, spans, 64, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _oracle(q, k, v, spans, 1.0), rtol=1e-5, atol=1e-5)


def test_nan_query_propagates():
    q, k, v = _problem(1, 2, 1, 16, 32)
    q[0, 1, 3] = float("nan")
    got = decode_attention(q, k, v, _spans(1, 1, [[0, 32]]), 32, 0.25)
    assert torch.isnan(got[0, 1]).all() and torch.isfinite(got[0, 0]).all()


@pytest.mark.parametrize(
    "pairs,n,match",
    [
        ([[0, 10], [5, 10]], 32, "ascending, disjoint"),
        ([[10, 5], [0, 5]], 32, "ascending, disjoint"),
        ([[30, 5]], 32, r"inside \[0, 32\)"),
        ([[0, -1]], 32, "ascending"),
        ([[0, 0]], 32, "no token selected"),
    ],
)
def test_bad_spans_raise_one_line_errors(pairs, n, match):
    q, k, v = _problem(1, 2, 1, 16, 40)
    with pytest.raises(DataError, match=match):
        decode_attention(q, k, v, _spans(1, 1, pairs), n, 0.25)


def test_bad_arguments_raise():
    q, k, v = _problem(1, 4, 2, 16, 40)
    spans = _spans(1, 2, [[0, 8]])
    with pytest.raises(DataError, match="q must be float32"):
        decode_attention(q.double(), k, v, spans, 8, 0.25)
    with pytest.raises(DataError, match="k and v must both"):
        decode_attention(q, k, v.bfloat16(), spans, 8, 0.25)
    with pytest.raises(DataError, match="does not fit q"):
        decode_attention(q[:, :3].contiguous(), k, v, spans, 8, 0.25)
    with pytest.raises(DataError, match="spans must be int32"):
        decode_attention(q, k, v, spans.long(), 8, 0.25)
    with pytest.raises(DataError, match="valid tokens"):
        decode_attention(q, k, v, spans, 41, 0.25)
    with pytest.raises(DataError, match="contiguous"):
        decode_attention(q, k.transpose(2, 3), v, spans, 8, 0.25)


def test_unknown_isa_is_a_config_error(monkeypatch):
    q, k, v = _problem(1, 2, 1, 16, 8)
    monkeypatch.setenv("SPARSEFORGE_ISA", "sse9")
    with pytest.raises(ConfigError):
        decode_attention(q, k, v, _spans(1, 1, [[0, 8]]), 8, 0.25)


def test_fake_impl_gives_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(1, 8, 64), torch.empty(1, 2, 32, 64), torch.empty(1, 2, 32, 64)
        out = torch.ops.sparseforge.decode_attention(q, k, v, torch.empty(1, 2, 1, 2, dtype=torch.int32), 32, 0.1)
    assert out.shape == (1, 8, 64) and out.dtype == torch.float32


def _bound(q, kmin, kmax, pages):
    """float64 Quest bound (B, Hkv, pages), group summed, straight from the paper's max(q M, q m)."""
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    qq = q.double().view(B, Hkv, Hq // Hkv, 1, D)
    hi, lo = qq * kmax[:, :, None, :pages].double(), qq * kmin[:, :, None, :pages].double()
    return torch.maximum(hi, lo).sum((2, 4))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,D", [(4, 64), (1, 13), (7, 8)])
def test_quest_select_every_isa_matches_reference_and_bound(isa, dtype, G, D, monkeypatch):
    from sparseforge.ops.decode_attention import quest_select, quest_select_ref

    g = torch.Generator().manual_seed(G * D)
    B, Hkv, pcap, pages, keep = 2, 2, 40, 37, 9
    a, b = torch.randn(B, Hkv, pcap, D, generator=g), torch.randn(B, Hkv, pcap, D, generator=g)
    kmin, kmax = torch.minimum(a, b).to(dtype), torch.maximum(a, b).to(dtype)
    q = torch.randn(B, Hkv * G, D, generator=g)
    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    got = quest_select(q, kmin, kmax, pages, keep)
    assert torch.equal(got, quest_select_ref(q, kmin, kmax, pages, keep))
    score = _bound(q, kmin, kmax, pages)
    for bh in range(B * Hkv):
        b_, h = divmod(bh, Hkv)
        chosen = got[b_, h].long()
        assert torch.equal(chosen, chosen.sort().values) and len(set(chosen.tolist())) == keep
        rest = torch.ones(pages, dtype=torch.bool)
        rest[chosen] = False
        assert score[b_, h, chosen].min() >= score[b_, h, rest].max() - 1e-4  # the keep largest bounds


def test_quest_select_edges_and_errors():
    from sparseforge.ops.decode_attention import quest_select

    kmin = torch.zeros(1, 1, 4, 8)
    kmax = torch.ones(1, 1, 4, 8)
    q = torch.ones(1, 2, 8)
    assert quest_select(q, kmin, kmax, 4, 4)[0, 0].tolist() == [0, 1, 2, 3]  # all pages
    assert quest_select(q, kmin, kmax, 4, 2)[0, 0].tolist() == [0, 1]  # ties: the lower pages
    assert quest_select(q, kmin, kmax, 3, 0).shape == (1, 1, 0)
    with pytest.raises(DataError, match="keep"):
        quest_select(q, kmin, kmax, 5, 2)
    with pytest.raises(DataError, match="keep"):
        quest_select(q, kmin, kmax, 2, 3)
    with pytest.raises(DataError, match="kmin and kmax"):
        quest_select(q, kmin, kmax.bfloat16(), 4, 2)


def test_eager_helpers_equal_the_registered_ops():
    from sparseforge.ops.decode_attention import attend, quest_select, select_pages

    q, k, v = _problem(1, 8, 2, 32, 64)
    spans = _spans(1, 2, [[0, 3], [10, 40]])
    assert torch.equal(attend(q, k, v, spans, 60, 0.2), decode_attention(q, k, v, spans, 60, 0.2))
    kmin, kmax = torch.minimum(k[:, :, :8], v[:, :, :8]).contiguous(), torch.maximum(k[:, :, :8], v[:, :, :8]).contiguous()
    assert torch.equal(select_pages(q, kmin, kmax, 8, 3), quest_select(q, kmin, kmax, 8, 3))
    with pytest.raises(DataError, match="spans must be int32"):
        attend(q, k, v, spans.long(), 60, 0.2)


@pytest.mark.parametrize("isa", ISAS)
def test_lse_matches_reference_and_merging_disjoint_sets_is_exact(isa, monkeypatch):
    from sparseforge.ops.decode_attention import decode_attention_lse, merge_attention

    q, k, v = _problem(2, 8, 2, 64, 500, seed=4)
    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    a, b, both = _spans(2, 2, [[0, 4]]), _spans(2, 2, [[100, 300]]), _spans(2, 2, [[0, 4], [100, 300]])
    out_a, lse_a = decode_attention_lse(q, k, v, a, 500, 0.125)
    out_b, lse_b = decode_attention_lse(q, k, v, b, 500, 0.125)
    ref_out, ref_lse = decode_attention_ref(q, k, v, a, 500, 0.125, lse=True)
    torch.testing.assert_close(lse_a, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_a, ref_out, rtol=1e-5, atol=1e-5)
    # lse = log sum exp(scale q.k) over the selected tokens, in float64
    s = torch.einsum("bhd,bhtd->bht", q.double(), k.double().repeat_interleave(4, 1)[:, :, 100:400]) * 0.125
    torch.testing.assert_close(lse_b.double(), s.logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merge_attention(out_a, lse_a, out_b, lse_b), decode_attention(q, k, v, both, 500, 0.125),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# D = 16 S <= 128: the AVX-512 direct path (tokens 4 or 2 at a time, value tiles of 4 or 2 rows, partial tiles)
@pytest.mark.parametrize("D,G,keep", [(64, 4, 21), (128, 2, 40), (13, 3, 5), (70, 1, 70), (64, 8, 21), (128, 3, 40),
                                      (96, 5, 30), (16, 1, 5), (256, 2, 77)])
def test_sparse_kv_every_isa_matches_reference_and_pruned_oracle(isa, dtype, D, G, keep, monkeypatch):
    from sparseforge.ops.sparse_kv import compress_tokens, sparse_kv_attention, sparse_kv_attention_ref

    B, Hkv, n = 2, 2, 300
    q, k, v = _problem(B, Hkv * G, Hkv, D, n, seed=D, dtype=dtype)
    (kv, kb), (vv, vb) = compress_tokens(k, keep), compress_tokens(v, keep)
    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    out, lse = sparse_kv_attention(q, kv, kb, vv, vb, 290, 0.2)
    ref_out, ref_lse = sparse_kv_attention_ref(q, kv, kb, vv, vb, 290, 0.2)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)

    def pruned(x):
        idx = x.float().abs().topk(keep, dim=-1).indices
        return torch.zeros(x.shape).scatter(-1, idx, x.float().gather(-1, idx))

    spans = _spans(B, Hkv, [[0, 290]])
    torch.testing.assert_close(out.double(), _oracle(q, pruned(k), pruned(v), spans, 0.2), rtol=1e-5, atol=1e-5)


def test_sparse_kv_bad_bitmaps_and_shapes():
    from sparseforge.ops.sparse_kv import compress_tokens, sparse_kv_attention

    q, k, v = _problem(1, 2, 1, 16, 8)
    (kv, kb), (vv, vb) = compress_tokens(k, 4), compress_tokens(v, 4)
    bad = kb.clone()
    bad[0, 0, 3, 0] = int(bad[0, 0, 3, 0]) | 0xFFFF  # every channel: 16 bits, not 4
    with pytest.raises(DataError, match="exactly keep=4"):
        sparse_kv_attention(q, kv, bad, vv, vb, 8, 0.2)
    beyond = kb.clone()
    word = int(kb[0, 0, 0, 0])
    beyond[0, 0, 0, 0] = (word ^ (word & -word)) | (1 << 40)  # still 4 bits, one of them past channel 15
    with pytest.raises(DataError, match="exactly keep=4"):
        sparse_kv_attention(q, kv, beyond, vv, vb, 8, 0.2)
    with pytest.raises(DataError, match="compressed tokens"):
        sparse_kv_attention(q, kv, kb, vv, vb, 9, 0.2)
    with pytest.raises(DataError, match="kvals / vvals"):
        sparse_kv_attention(q, kv, kb.int(), vv, vb, 8, 0.2)
    with pytest.raises(DataError, match=r"keep=0 must be in \[1, 16\]"):
        compress_tokens(k, 0)


@pytest.mark.parametrize("isa", ISAS)
def test_sparse_kv_names_the_bad_token_on_every_isa(isa, monkeypatch):
    """The per-chunk bitmap check (before any value of the token is read) names the token and tensor."""
    from sparseforge.ops.sparse_kv import compress_tokens, sparse_kv_attention

    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    q, k, v = _problem(1, 8, 2, 64, 700)
    (kv, kb), (vv, vb) = compress_tokens(k, 21), compress_tokens(v, 21)
    bad = vb.clone()
    bad[0, 1, 613, 0] = int(bad[0, 1, 613, 0]) & (int(bad[0, 1, 613, 0]) - 1)  # one bit fewer
    with pytest.raises(DataError, match=r"value bitmap of token 613 \(batch 0, kv head 1\) must mark exactly keep=21"):
        sparse_kv_attention(q, kv, kb, vv, bad, 700, 0.2)
    out, lse = sparse_kv_attention(q, kv, kb, vv, vb, 700, 0.2)  # the good bitmaps still run
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bound_attention_follows_its_buffers_and_matches_the_reference(dtype):
    from sparseforge.ops.decode_attention import BoundDecodeAttention

    q, k, v = _problem(Hq=8, Hkv=2, cap=40, seed=3, dtype=dtype)
    spans = _spans(1, 2, [[0, 1]])
    bound = BoundDecodeAttention(q, k, v, spans, 0.125)
    for n, seed in ((1, 4), (17, 5), (40, 6)):
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)))  # written in place, as a decode loop does
        k[:, :, n - 1] += 1.0
        spans[..., 1] = n
        got = bound(n).clone()
        assert torch.equal(got, decode_attention(q, k, v, spans, n, 0.125))  # the same dispatched kernel
        torch.testing.assert_close(got, decode_attention_ref(q, k, v, spans, n, 0.125), atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match="must be in \\[1, 40\\]"):
        bound(41)
    spans[..., 1] = 30
    with pytest.raises(DataError):
        bound(20)  # a span beyond the valid length
    with pytest.raises(DataError, match="contiguous"):
        BoundDecodeAttention(q, k.transpose(2, 3), v, spans, 0.125)
