"""Policies (sparseforge.attention.policies) against first-principles oracles: Quest's page choice
against the bound computed from the raw keys' page min/max (rounded outward to bfloat16, as the cache
keeps them) per query head and summed over the GQA group (and the bound really bounds q . k), StreamingLLM's spans, and the decode attention of each policy against
SDPA masked to exactly the tokens the policy names; padding and sliding-window clipping."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.attention import Dense, PagedKVCache, Quest, StreamingLLM, sparseforge_attention
from sparseforge.attention.cache import bf16_bounds
from sparseforge.attention.interface import clip_spans
from sparseforge.errors import DataError, ModelError
from decode_oracles import decode_one as _decode, sdpa_over as _sdpa_over


def _filled(n, B=1, Hkv=2, D=16, page=16, seed=0, dtype=torch.float32, policy=None):
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(num_layers=4, page_size=page, policy=policy or Dense())
    k = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
    cache.update(k, v, 3)
    return cache.layers[3], k, v


def _mask(spans, n):
    """bool (B, Hkv, n): the tokens the spans select."""
    B, Hkv = spans.shape[:2]
    m = torch.zeros(B, Hkv, n, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            for s, length in spans[b, h].tolist():
                m[b, h, s:s + length] = True
    return m


def _brute_force_quest(q, keys, P, pages_read):
    """Page indices per (b, KV head): top (pages_read - 1) complete pages by the bound
    sum_{g in group} sum_d max(q_gd min_t k_td, q_gd max_t k_td), the page's per-channel key min and
    max rounded outward to bfloat16 first (the cache's metadata), plus the newest page."""
    B, Hq, D = q.shape
    Hkv, n = keys.shape[1], keys.shape[2]
    G, npages = Hq // Hkv, -(-n // P)
    out = []
    for b in range(B):
        row = []
        for h in range(Hkv):
            scores = []
            for p in range(npages - 1):
                lo, hi = bf16_bounds(*keys[b, h, p * P:(p + 1) * P].aminmax(dim=0))  # (D,) each
                lo, hi = lo.double(), hi.double()
                s = sum(torch.maximum(q[b, h * G + g].double() * lo, q[b, h * G + g].double() * hi).sum() for g in range(G))
                scores.append(float(s))
            top = sorted(sorted(range(npages - 1), key=lambda i: -scores[i])[:pages_read - 1])
            row.append(top + [npages - 1])
        out.append(row)
    return out


@settings(max_examples=25, deadline=None)
@given(n=st.integers(65, 400), budget_pages=st.integers(2, 4), G=st.sampled_from([1, 2, 4]), seed=st.integers(0, 999))
def test_quest_picks_the_pages_with_the_largest_group_bound(n, budget_pages, G, seed):
    P = 16
    layer, keys, _ = _filled(n, Hkv=2, page=P, seed=seed)
    q = torch.randn(1, 2 * G, 16, generator=torch.Generator().manual_seed(seed + 1))
    spans = Quest(budget=budget_pages * P).spans(layer, q, layer_idx=5)
    want = _brute_force_quest(q, keys, P, budget_pages)
    got = [[[s // P for s in spans[0, h, :, 0].tolist()]] for h in range(2)]
    assert [g[0] for g in got] == want[0]
    assert spans[0, :, -1, 1].tolist() == [n - (-(-n // P) - 1) * P] * 2  # the newest page, partial
    assert (spans[0, :, :-1, 1] == P).all()


def test_quest_bound_is_an_upper_bound_of_every_score_in_the_page():
    layer, keys, _ = _filled(160, Hkv=1, D=32, seed=3)
    q = torch.randn(32)
    kmin, kmax = layer.page_bounds(10)
    bound = torch.maximum(q * kmax[0, 0], q * kmin[0, 0]).sum(-1)  # (10,) Quest's bound from the metadata
    actual = (keys[0, 0] @ q).view(10, 16).amax(1)
    assert (bound >= actual - 1e-5).all() and (bound - actual).abs().max() > 0


def test_quest_is_dense_in_the_first_layers_and_within_budget():
    layer, _, _ = _filled(200)
    q = torch.randn(1, 2, 16)
    dense = [[[0, 200]]] * 2
    assert Quest(budget=64).spans(layer, q, layer_idx=1)[0].tolist() == dense
    assert Quest(budget=208).spans(layer, q, layer_idx=7)[0].tolist() == dense
    assert Quest(budget=64, dense_layers=0).spans(layer, q, layer_idx=0).shape == (1, 2, 4, 2)


def test_streaming_spans():
    layer, _, _ = _filled(100)
    q = torch.randn(1, 2, 16)
    assert StreamingLLM(sinks=4, window=20).spans(layer, q, 0)[0, 0].tolist() == [[0, 4], [80, 20]]
    assert StreamingLLM(sinks=0, window=20).spans(layer, q, 0)[0, 0].tolist() == [[0, 0], [80, 20]]
    assert StreamingLLM(sinks=4, window=96).spans(layer, q, 0)[0, 0].tolist() == [[0, 100]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", [Dense(), StreamingLLM(4, 50), Quest(budget=64, dense_layers=0)])
def test_decode_equals_sdpa_over_the_selected_tokens(policy, dtype):
    n = 300
    layer, keys, values = _filled(n, B=2, Hkv=2, D=32, dtype=dtype, policy=policy)
    q = torch.randn(2, 8, 32)
    spans = policy.spans(layer, q, 3)
    got = _decode(layer, q)
    want = _sdpa_over(q, keys, values, _mask(spans, n))
    torch.testing.assert_close(got, want.to(dtype).float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-4)
    if not isinstance(policy, Dense):
        assert _mask(spans, n).sum() < 2 * 2 * n  # really sparse


def test_left_padding_and_sliding_window_clip_the_spans():
    n = 120
    layer, keys, values = _filled(n, B=2, Hkv=2, D=16)
    q = torch.randn(2, 4, 16)
    allowed = torch.ones(2, 1, 1, n, dtype=torch.bool)
    allowed[0, ..., :7] = False  # row 0 left-padded by 7 tokens
    got = _decode(layer, q, allowed)
    torch.testing.assert_close(got, _sdpa_over(q, keys, values, allowed[:, 0, 0].unsqueeze(1).expand(2, 2, n)), rtol=1e-4, atol=1e-5)
    got = _decode(layer, q, None, sliding_window=30)
    window = torch.zeros(2, 2, n, dtype=torch.bool)
    window[..., n - 30:] = True
    torch.testing.assert_close(got, _sdpa_over(q, keys, values, window), rtol=1e-4, atol=1e-5)


def test_padding_in_the_middle_is_an_error():
    layer, _, _ = _filled(40)
    allowed = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    allowed[..., 10] = False
    with pytest.raises(DataError, match="padding on the left only"):
        _decode(layer, torch.randn(1, 2, 16), allowed)


def test_clip_spans():
    spans = torch.tensor([[[[0, 4], [10, 10], [30, 5]]]], dtype=torch.int32)
    assert clip_spans(spans, torch.tensor([12]))[0, 0].tolist() == [[0, 0], [12, 8], [30, 5]]


def test_decoding_without_a_paged_cache_names_the_module():
    module = SimpleNamespace(layer_idx=0)
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(ModelError, match="SimpleNamespace did not hand one"):
        sparseforge_attention(module, q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), None, scaling=0.3)


def _reference_snapkv_votes(q, keys, window):
    """FasterDecoding/SnapKV's update_kv votes, written out for MHA: (B, H, T - window)."""
    B, H, T, D = q.shape
    w = window
    attn = q[..., -w:, :] @ keys.transpose(2, 3) / D ** 0.5  # (B, H, w, T)
    mask = torch.full((w, w), torch.finfo(attn.dtype).min)
    cond = torch.arange(w)
    mask.masked_fill_(cond < (cond + 1).view(w, 1), 0)
    attn[:, :, -w:, -w:] += mask
    return attn.softmax(-1)[:, :, -w:, :-w].sum(-2)


def _reference_snapkv_keep(votes, window, capacity, kernel, pooling):
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    votes = pool(votes, kernel_size=kernel, padding=kernel // 2, stride=1)
    return votes.topk(capacity - window, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
def test_snapkv_keeps_what_the_reference_keeps(pooling):
    from sparseforge.attention import SnapKV

    T, H, D = 120, 3, 16
    policy = SnapKV(window=8, capacity=40, kernel=5, pooling=pooling)
    layer, keys, _ = _filled(T, B=2, Hkv=H, D=D, policy=policy)
    q = torch.randn(2, H, T, D)
    policy.observe_prefill(layer, q, D ** -0.5)
    prompt, keep = layer.policy_state["snapkv"]
    assert prompt == T
    assert torch.equal(keep.long(), _reference_snapkv_keep(_reference_snapkv_votes(q, keys, 8), 8, 40, 5, pooling))
    spans = policy.spans(layer, q[:, :, -1], 3)
    assert _mask(spans, T).sum(-1).tolist() == [[40] * H] * 2  # capacity tokens per KV head


def test_snapkv_group_votes_are_summed_and_decode_matches_masked_sdpa():
    from sparseforge.attention import SnapKV

    T, D = 100, 16
    policy = SnapKV(window=10, capacity=30, kernel=3)
    layer, keys, values = _filled(T, B=1, Hkv=2, D=D, policy=policy)
    q = torch.randn(1, 4, T, D)
    policy.observe_prefill(layer, q, D ** -0.5)
    _, keep = layer.policy_state["snapkv"]
    votes = _reference_snapkv_votes(q, keys.repeat_interleave(2, 1), 10)  # per query head (B, 4, T - 10)
    group = votes.view(1, 2, 2, -1).sum(2)  # summed over each KV head's two query heads
    assert torch.equal(keep.long(), _reference_snapkv_keep(group, 10, 30, 3, "avgpool"))
    assert not torch.equal(keep.long(), _reference_snapkv_keep(votes[:, ::2], 10, 30, 3, "avgpool"))  # not one head's
    qd = torch.randn(1, 4, D)
    spans = policy.spans(layer, qd, 3)
    torch.testing.assert_close(_decode(layer, qd), _sdpa_over(qd, keys, values, _mask(spans, T)), rtol=1e-4, atol=1e-5)


def test_snapkv_short_prompts_and_later_chunks_stay_dense():
    from sparseforge.attention import SnapKV

    policy = SnapKV(window=8, capacity=64)
    layer, _, _ = _filled(50, policy=policy)
    policy.observe_prefill(layer, torch.randn(1, 2, 50, 16), 0.25)
    assert "snapkv" not in layer.policy_state
    assert policy.spans(layer, torch.randn(1, 2, 16), 3)[0, 0].tolist() == [[0, 50]]


@pytest.mark.parametrize(
    "kw,match",
    [(dict(window=0), "window"), (dict(capacity=16, window=16), "must exceed"), (dict(kernel=4), "odd"),
     (dict(pooling="mean"), "pooling")],
)
def test_snapkv_bad_config(kw, match):
    from sparseforge.attention import SnapKV
    from sparseforge.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        SnapKV(**kw)


@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_streaming_cache_positions_equal_the_papers_re_indexed_cache(rope_type):
    """positions='cache' == attention over [sinks, window] with RoPE applied at cache positions 0..s+w-1
    (the paper), built here from pre-RoPE keys with transformers' own rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rope = {"rope_type": "default", "rope_theta": 500.0}
    if rope_type == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_parameters=rope)
    rot = LlamaRotaryEmbedding(cfg)
    n, s, w = 300, 4, 20
    g = torch.Generator().manual_seed(0)
    k_raw, v = torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
    q_raw = torch.randn(1, 4, 1, 16, generator=g)

    def rope_at(x, positions):
        cos, sin = rot(x, torch.tensor([positions]))
        return apply_rotary_pos_emb(x, x, cos, sin)[0]

    policy = StreamingLLM(s, w, positions="cache")
    cache = PagedKVCache(num_layers=1, policy=policy)
    cache.update(rope_at(k_raw, list(range(n))), v, 0)  # as transformers caches them: text positions
    layer = cache.layers[0]
    q = rope_at(q_raw, [n - 1])[:, :, 0]  # (1, 4, 16)
    module = SimpleNamespace(layer_idx=0, config=cfg)
    got = _decode(layer, q, module=module)

    kept = list(range(s)) + list(range(n - w, n))
    k_paper = rope_at(k_raw[:, :, kept], list(range(s + w)))
    q_paper = rope_at(q_raw, [s + w - 1])
    want = F.scaled_dot_product_attention(q_paper, k_paper.repeat_interleave(2, 1), v[:, :, kept].repeat_interleave(2, 1))
    torch.testing.assert_close(got, want[:, :, 0], rtol=1e-4, atol=1e-5)
    cache.set_policy(StreamingLLM(s, w))  # text positions: the sinks at their true distance, not the paper's
    assert not torch.allclose(_decode(layer, q, module=module), got, atol=1e-4)


def test_streaming_cache_positions_bad_settings():
    from sparseforge.errors import ConfigError

    with pytest.raises(ConfigError, match="positions must be"):
        StreamingLLM(4, 8, positions="absolute")


def test_decoding_with_gradients_is_refused():
    from sparseforge.errors import ConfigError

    layer, _, _ = _filled(20)
    q = torch.randn(1, 2, 16, requires_grad=True)
    with pytest.raises(ConfigError, match="inference only"):
        _decode(layer, q)
    with torch.no_grad():
        assert _decode(layer, q).shape == (1, 2, 16)


def _prune(x, keep):
    """x with all but the keep largest magnitudes of every token zeroed (Mustafar's pruning, dense)."""
    idx = x.abs().topk(keep, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mustafar_decode_equals_sdpa_over_pruned_old_tokens(dtype):
    from sparseforge.attention import Mustafar

    n, D = 700, 64
    policy = Mustafar(sparsity=0.7, recent=100)
    layer, keys, values = _filled(n, B=1, Hkv=2, D=D, dtype=dtype, policy=policy)
    q = torch.randn(1, 8, D)
    got = _decode(layer, q)
    done = layer.policy_state["mustafar"]["done"]
    assert done == 512  # whole 256-token chunks older than the 100 recent tokens
    keep = policy.keep(D)[0]
    assert keep == 64 - int(0.7 * 64) + 1
    k_ref = torch.cat([_prune(keys[:, :, :done].float(), keep), keys[:, :, done:].float()], 2)
    v_ref = torch.cat([_prune(values[:, :, :done].float(), keep), values[:, :, done:].float()], 2)
    want = _sdpa_over(q, k_ref, v_ref, torch.ones(1, 2, n, dtype=torch.bool))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    dense = _sdpa_over(q, keys, values, torch.ones(1, 2, n, dtype=torch.bool))
    assert not torch.allclose(got, dense, atol=1e-3)  # the pruning is real
    st = layer.policy_state["mustafar"]
    compressed = sum(st[k].numel() * st[k].element_size() for k in ("kvals", "kbits", "vvals", "vbits"))
    dense_bytes = 2 * done * 2 * D * keys.element_size()
    assert compressed / dense_bytes == (keep * keys.element_size() + 8) / (D * keys.element_size())


def test_mustafar_compresses_as_tokens_arrive_and_after_crop():
    from sparseforge.attention import Mustafar

    policy = Mustafar(sparsity=0.5, recent=16)
    layer, _, _ = _filled(270, D=16, policy=policy)
    q = torch.randn(1, 2, 16)
    _decode(layer, q)
    assert layer.policy_state["mustafar"]["done"] == 0  # 270 - 16 = 254 old tokens: no whole 256-token chunk yet
    layer.update(torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16))
    _decode(layer, q)
    assert layer.policy_state["mustafar"]["done"] == 256
    layer.crop(-100)  # below the compressed tokens: recompressed from the dense copy when needed
    _decode(layer, q)
    assert layer.policy_state["mustafar"]["done"] == 0


@pytest.mark.parametrize("kw,match", [(dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
                                      (dict(recent=0), "recent"), (dict(value_sparsity=2), "value_sparsity")])
def test_mustafar_bad_config(kw, match):
    from sparseforge.attention import Mustafar
    from sparseforge.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        Mustafar(**kw)
