"""Quest in one native call (csrc/quest_attention*, ``sparseforge::quest_attention``): every ISA against
the scalar reference, the two-call path (``quest_select`` + ``decode_attention``) and torch SDPA over the
chosen tokens; property tests of the selection (budget, each page once, the newest page always, the
highest bounds, ties to the lower page); the policy path (same pages and output as ``Quest.spans``,
dense layers and short contexts not fused, generate unchanged); bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.errors import DataError
from sparseforge.ops.decode_attention import decode_attention, quest_select
from sparseforge.ops.quest_attention import (attend_quest, quest_attention, quest_attention_pages,
                                             quest_attention_ref)

N = kernels.native()
ISAS = [i for i in kernels.ISAS if kernels.cpu_supports(i)]


def _case(B=1, Hq=8, Hkv=2, D=64, n=300, page=16, seed=0, dtype=torch.float32, levels=0):
    """q (B, Hq, D), k and v (B, Hkv, cap, D) with cap > n, per-page key bounds (B, Hkv, pages, D) in
    bfloat16 as the cache keeps them; ``levels`` > 0 draws keys from that many integers (many ties)."""
    g = torch.Generator().manual_seed(seed)
    cap = -(-n // page) * page + page
    q = torch.randn(B, Hq, D, generator=g)
    if levels:
        k = torch.randint(0, levels, (B, Hkv, cap, D), generator=g).float()
    else:
        k = torch.randn(B, Hkv, cap, D, generator=g)
    k, v = k.to(dtype), torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    pages = k.float().view(B, Hkv, cap // page, page, D)
    kmin, kmax = pages.amin(3).bfloat16().contiguous(), pages.amax(3).bfloat16().contiguous()
    return q, k, v, kmin, kmax


def _spans_of(chosen, n, page):
    """The two-call path's spans: the chosen pages, then the newest page [full * page, n)."""
    B, Hkv, keep = chosen.shape
    full = -(-n // page) - 1
    spans = torch.empty(B, Hkv, keep + 1, 2, dtype=torch.int32)
    spans[..., :keep, 0] = chosen * page
    spans[..., :keep, 1] = page
    spans[..., keep, 0] = full * page
    spans[..., keep, 1] = n - full * page
    return spans


def _sdpa_over(q, k, v, spans, scale):
    """torch SDPA of each KV head's group over the gathered chosen tokens."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.empty(B, Hq, D)
    for b in range(B):
        for h in range(Hkv):
            idx = torch.cat([torch.arange(s, s + l) for s, l in spans[b, h].tolist()])
            kk, vv = k[b, h, idx].float(), v[b, h, idx].float()
            qq = q[b, h * G:(h + 1) * G].unsqueeze(1)  # (G, 1, D)
            out[b, h * G:(h + 1) * G] = F.scaled_dot_product_attention(qq, kk.expand(G, -1, -1), vv.expand(G, -1, -1),
                                                                       scale=scale).squeeze(1)
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,D,n", [(1, 32, 8, 64, 1000), (2, 8, 2, 64, 300), (1, 6, 2, 20, 257), (3, 1, 1, 8, 64)])
def test_every_isa_matches_reference_two_call_path_and_sdpa(isa, dtype, B, Hq, Hkv, D, n, monkeypatch):
    page, scale = 16, D ** -0.5
    q, k, v, kmin, kmax = _case(B, Hq, Hkv, D, n, page, seed=n + D, dtype=dtype)
    read = max(1, -(-n // page) // 4)
    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    out, chosen = quest_attention_pages(q, k, v, kmin, kmax, n, page, read, scale)
    ref_out, ref_chosen = quest_attention_ref(q, k, v, kmin, kmax, n, page, read, scale)
    full = -(-n // page) - 1
    assert torch.equal(chosen, ref_chosen)
    assert torch.equal(chosen, quest_select(q, kmin, kmax, full, read - 1))
    spans = _spans_of(chosen, n, page)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, decode_attention(q, k, v, spans, n, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _sdpa_over(q, k, v, spans, scale), rtol=1e-4, atol=1e-4)
    assert torch.equal(attend_quest(q, k, v, kmin, kmax, n, page, read, scale), out)
    assert torch.equal(quest_attention(q, k, v, kmin, kmax, n, page, read, scale), out)


@pytest.mark.parametrize("isa", ISAS)
def test_ties_go_to_the_lower_page_like_the_reference(isa, monkeypatch):
    q, k, v, kmin, kmax = _case(2, 8, 2, 16, 700, levels=2, seed=3)  # 0/1 keys: most page bounds equal
    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    for read in (1, 2, 7, 30, 44):
        _, chosen = quest_attention_pages(q, k, v, kmin, kmax, 700, 16, read, 0.25)
        assert torch.equal(chosen, quest_attention_ref(q, k, v, kmin, kmax, 700, 16, read, 0.25)[1])
    kmin.zero_()
    kmax.zero_()  # every bound 0: the lowest pages
    _, chosen = quest_attention_pages(q, k, v, kmin, kmax, 700, 16, 6, 0.25)
    assert chosen[0, 0].tolist() == [0, 1, 2, 3, 4]


def test_threads_and_serial_agree():
    q, k, v, kmin, kmax = _case(1, 32, 8, 64, 2000, seed=5)
    B, Hq, D = q.shape
    outs = []
    for parallel in (True, False):
        out = torch.full(q.shape, float("nan"))
        chosen = torch.empty(1, 8, 24, dtype=torch.int32)
        N.quest_attention(q.numpy(), k.numpy(), v.numpy(), kmin.view(torch.uint16).numpy(), kmax.view(torch.uint16).numpy(),
                          2000, 16, 25, 0.125, out.numpy(), "", parallel, None, chosen.numpy())
        outs.append((out, chosen))
    assert torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][0], outs[1][0])  # one chunk per KV head either way: bitwise equal


def test_lse_matches_the_decode_kernel():
    from sparseforge.ops.decode_attention import decode_attention_lse

    q, k, v, kmin, kmax = _case(1, 8, 2, 64, 500, seed=6)
    out = torch.empty(q.shape)
    lse = torch.empty(q.shape[:2])
    chosen = torch.empty(1, 2, 7, dtype=torch.int32)
    N.quest_attention(q.numpy(), k.numpy(), v.numpy(), kmin.view(torch.uint16).numpy(), kmax.view(torch.uint16).numpy(),
                      500, 16, 8, 0.125, out.numpy(), "", True, lse.numpy(), chosen.numpy())
    ref_out, ref_lse = decode_attention_lse(q, k, v, _spans_of(chosen, 500, 16), 500, 0.125)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 600), page=st.sampled_from([1, 4, 16, 32]), frac=st.floats(0.0, 1.0),
       G=st.sampled_from([1, 2, 4]), levels=st.sampled_from([0, 2, 3]), seed=st.integers(0, 10**6))
def test_selection_invariants(n, page, frac, G, levels, seed):
    npages = -(-n // page)
    read = 1 + int(frac * (npages - 1))
    q, k, v, kmin, kmax = _case(1, 2 * G, 2, 8, n, page, seed=seed, levels=levels)
    out, chosen = quest_attention_pages(q, k, v, kmin, kmax, n, page, read, 0.3)
    full = npages - 1
    qq = q.double().view(1, 2, G, 1, 8)
    bound = torch.maximum(qq * kmax[:, :, None, :full].double(), qq * kmin[:, :, None, :full].double()).sum((2, 4))
    for h in range(2):
        pages = chosen[0, h].tolist()
        assert len(pages) == read - 1  # the budget: read - 1 complete pages plus the newest
        assert pages == sorted(set(pages)) and all(0 <= p < full for p in pages)  # each page once, never the newest
        rest = sorted(set(range(full)) - set(pages))
        if pages and rest:
            assert bound[0, h, pages].min() >= bound[0, h, rest].max() - 1e-4  # the highest bounds
    spans = _spans_of(chosen, n, page)
    assert int(spans[..., 1].sum()) == 2 * ((read - 1) * page + n - full * page)  # tokens read per KV head
    torch.testing.assert_close(out, decode_attention(q, k, v, spans, n, 0.3), rtol=1e-5, atol=1e-5)
    assert torch.equal(chosen, quest_attention_ref(q, k, v, kmin, kmax, n, page, read, 0.3)[1])


@pytest.mark.parametrize("kw, match", [
    ({"read": 0}, "read=0"),
    ({"read": 20}, "read=20"),
    ({"page": 0}, "page must be"),
    ({"n": 0}, "n=0"),
    ({"kmin_pages": 3}, "kmin holds 3 pages"),
    ({"kmax_dtype": torch.float32}, "kmin and kmax"),
])
def test_bad_input_raises_one_line_errors(kw, match):
    q, k, v, kmin, kmax = _case(1, 4, 1, 8, 300)
    n, page, read = kw.get("n", 300), kw.get("page", 16), kw.get("read", 4)
    if "kmin_pages" in kw:
        kmin, kmax = kmin[:, :, :3].contiguous(), kmax[:, :, :3].contiguous()
    if "kmax_dtype" in kw:
        kmax = kmax.float()
    with pytest.raises(DataError, match=match) as info:
        quest_attention_pages(q, k, v, kmin, kmax, n, page, read, 0.3)
    assert "\n" not in str(info.value)


def test_native_errors_are_one_line():
    q, k, v, kmin, kmax = _case(1, 4, 1, 8, 300)
    out = torch.empty(q.shape)
    with pytest.raises(ValueError, match="read <= ceil"):
        N.quest_attention(q.numpy(), k.numpy(), v.numpy(), kmin.view(torch.uint16).numpy(), kmax.view(torch.uint16).numpy(),
                          300, 16, 30, 0.3, out.numpy())
    with pytest.raises(ValueError, match="chosen must be int32"):
        N.quest_attention(q.numpy(), k.numpy(), v.numpy(), kmin.view(torch.uint16).numpy(), kmax.view(torch.uint16).numpy(),
                          300, 16, 3, 0.3, out.numpy(), chosen=torch.empty(1, 1, 5, dtype=torch.int32).numpy())


def test_fake_impl_gives_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, kmin, kmax = _case(1, 4, 1, 8, 300)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (q, k, v, kmin, kmax)]
        out = quest_attention(*args, 300, 16, 4, 0.3)
    assert out.shape == q.shape and out.dtype == torch.float32


# ---- through the policy and the cache


def _filled_layer(n, dtype=torch.float32, seed=0, policy=None):
    from sparseforge.attention import PagedKVCache, Quest

    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(num_layers=1, page_size=16, policy=policy or Quest(budget=64))
    k, v = (torch.randn(1, 2, n, 32, generator=g).to(dtype) for _ in range(2))
    cache.update(k, v, 0)
    return cache.layers[0], torch.randn(1, 8, 32, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [65, 200, 256])
def test_fused_step_equals_the_spans_path(dtype, n):
    from sparseforge.attention import Quest
    from sparseforge.ops.decode_attention import attend

    layer, q = _filled_layer(n, dtype)
    quest = Quest(budget=64)
    out, read = quest.fused_step(layer, q, 2, 0.2)
    spans = quest.spans(layer, q, 2)
    assert read == int(spans[..., 1].sum())
    torch.testing.assert_close(out, attend(q, layer.k_store, layer.v_store, spans, n, 0.2), rtol=1e-5, atol=1e-5)
    _, chosen = quest_attention_pages(q, layer.k_store, layer.v_store, layer.kmin, layer.kmax, n, 16, 4, 0.2)
    assert torch.equal(_spans_of(chosen, n, 16), spans)  # the same pages, the newest included


def test_dense_layers_and_short_contexts_are_not_fused():
    from sparseforge.attention import Quest

    layer, q = _filled_layer(200)
    assert Quest(budget=64).fused_step(layer, q, 1, 0.2) is None  # layers 0 and 1: dense
    assert Quest(budget=64, dense_layers=0).fused_step(layer, q, 0, 0.2) is not None
    assert Quest(budget=256).fused_step(layer, q, 5, 0.2) is None  # budget covers the context: dense


def test_generate_matches_the_unfused_path():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparseforge.attention import PagedKVCache, Quest, enable

    class Unfused(Quest):
        def fused_step(self, layer, query, layer_idx, scale):
            return None

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(enable())
    ids = torch.randint(0, 97, (1, 150))
    outs, reads = [], []
    for policy in (Quest(budget=48), Unfused(budget=48)):
        cache = PagedKVCache(config, policy=policy)
        outs.append(model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False))
        reads.append(cache.read_fraction())
    assert torch.equal(outs[0], outs[1])
    assert reads[0] == reads[1] < 1.0
