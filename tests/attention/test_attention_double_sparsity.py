"""Double Sparsity (sparseforge.attention.DoubleSparsity and its calibration) against first-principles
oracles: the tokens chosen are the top approximate scores q[label] . k[label] computed per query head
in float64 and summed over the GQA group; the decode attention equals SDPA over exactly those tokens
and equals dense attention when the budget covers the context; the label side cache follows appends
and crops; calibration ranks channels by mean |q_d k_d| of the rotated queries and keys (checked
against the model's own eager attention inputs); label files round-trip; bad input fails clearly;
inside transformers' generate it gives the dense output for covering budgets and changes it below."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.attention import (NAME, Dense, DoubleSparsity, PagedKVCache, calibrate_label_channels, enable,
                                   load_label_channels, save_label_channels)
from sparseforge.errors import ConfigError, DataError
from sparseforge.ops.label_select import unpack_codes
from decode_oracles import decode_one as _decode, sdpa_over as _sdpa_over
from tiny_models import tiny_model, tokens


def _filled(n, B=1, Hkv=2, D=16, seed=0, dtype=torch.float32, policy=None, layer=3):
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(num_layers=4, page_size=16, policy=policy or Dense())
    k = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
    cache.update(k, v, layer)
    return cache.layers[layer], k, v


def _random_labels(L, Hkv, D, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(D, generator=g)[:r] for _ in range(Hkv)]) for _ in range(L)])


def _dequantized_4bit(x):
    """x (..., C) -> its 4-bit label values from the definition: per token s = max |x| / 7, round(x / s)
    clamped to [-7, 7], times s (an all-zero token stays zero)."""
    x = x.double()
    s = x.abs().amax(-1, keepdim=True) / 7
    return torch.where(s > 0, torch.round(x / torch.where(s > 0, s, 1.0)).clamp(-7, 7) * s, 0.0)


def _reference_scores(q, keys, labels, bits=16):
    """float64 (B, Hkv, n): per query head q_h[label] . k[label] on its KV head's labels (4-bit labels:
    dequantized per token), summed over the group."""
    B, Hq, D = q.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hkv, keys.shape[2], dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            idx = labels[h]
            lab = keys[b, h][:, idx].double()
            lab = _dequantized_4bit(lab) if bits == 4 else lab
            for g in range(G):
                out[b, h] += lab @ q[b, h * G + g, idx].double()
    return out


@settings(max_examples=30, deadline=None)
@given(n=st.integers(20, 300), budget=st.integers(1, 40), G=st.sampled_from([1, 2, 4]), r=st.integers(1, 16),
       B=st.integers(1, 2), seed=st.integers(0, 10_000), bits=st.sampled_from([4, 16]))
def test_picks_exactly_the_tokens_with_the_top_group_summed_label_scores(n, budget, G, r, B, seed, bits):
    D, Hkv = 16, 2
    labels = _random_labels(4, Hkv, D, r, seed)
    policy = DoubleSparsity(channels=r, budget=budget, labels=labels, label_bits=bits)
    layer, keys, _ = _filled(n, B=B, Hkv=Hkv, D=D, seed=seed, policy=policy)
    q = torch.randn(B, Hkv * G, D, generator=torch.Generator().manual_seed(seed + 1))
    spans = policy.spans(layer, q, layer_idx=3)
    if n <= budget:
        assert spans.tolist() == [[[[0, n]]] * Hkv] * B
        return
    ref = _reference_scores(q, keys, labels[3], bits)
    torch.testing.assert_close(policy.scores(layer, q, 3).double(), ref, rtol=1e-4, atol=1e-4)
    assert spans.shape == (B, Hkv, budget, 2) and (spans[..., 1] == 1).all()
    for b in range(B):
        for h in range(Hkv):
            got = spans[b, h, :, 0].tolist()
            assert got == sorted(set(got))  # ascending, disjoint
            order = ref[b, h].sort(descending=True)
            if order.values[budget - 1] - order.values[budget] < 1e-4:  # a near tie: either token is right
                continue
            assert got == sorted(order.indices[:budget].tolist())


@pytest.mark.parametrize("bits", [4, 16])
def test_group_scores_are_summed_not_taken_per_query_head(bits):
    """Two query heads that disagree: the group sum decides, not either head alone."""
    D = 4
    labels = torch.tensor([[[0, 1]]])  # one layer, one KV head, channels 0 and 1
    keys = torch.zeros(1, 1, 3, D)
    keys[0, 0, 0, 0] = 3.0  # liked by head 0 only (score 3)
    keys[0, 0, 1, 1] = 2.0  # liked by head 1 only (score 2)
    keys[0, 0, 2, :2] = 1.5  # liked by both (score 1.5 + 1.5 = 3.0 summed) -> wins with token 0
    keys[0, 0, 1, 2:] = 1.0  # the full q . k would favour token 1: non-label channels must not count
    cache = PagedKVCache(num_layers=1, policy=DoubleSparsity(channels=2, budget=2, labels=labels, label_bits=bits))
    cache.update(keys, torch.randn(1, 1, 3, D), 0)
    q = torch.zeros(1, 2, D)
    q[0, 0, 0] = 1.0
    q[0, 1, 1] = 1.0
    q[0, :, 2:] = 100.0  # non-label channels are ignored
    layer = cache.layers[0]
    assert layer.policy.scores(layer, q, 0)[0, 0].tolist() == pytest.approx([3.0, 2.0, 3.0], rel=1e-6)
    assert layer.policy.spans(layer, q, 0)[0, 0, :, 0].tolist() == [0, 2]


@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_sdpa_over_the_chosen_tokens_and_dense_when_the_budget_covers(dtype, bits):
    n, D = 200, 32
    labels = _random_labels(4, 2, D, 8, 5)
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    q = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(9))
    policy = DoubleSparsity(channels=8, budget=24, labels=labels, label_bits=bits)
    layer, keys, values = _filled(n, B=2, D=D, dtype=dtype, policy=policy)
    allowed = torch.zeros(2, 2, n, dtype=torch.bool)
    top = _reference_scores(q, keys, labels[3], bits).topk(24, dim=-1).indices
    allowed.scatter_(-1, top, True)
    torch.testing.assert_close(_decode(layer, q), _sdpa_over(q, keys, values, allowed), **tol)
    assert layer.tokens_read == 2 * 2 * 24
    for budget in (n, n + 50):
        layer, keys, values = _filled(n, B=2, D=D, dtype=dtype,
                                      policy=DoubleSparsity(channels=8, budget=budget, labels=labels, label_bits=bits))
        torch.testing.assert_close(_decode(layer, q), _sdpa_over(q, keys, values, torch.ones(2, 2, n, dtype=torch.bool)), **tol)


@pytest.mark.parametrize("bits", [4, 16])
def test_label_cache_follows_appends_and_crops(bits):
    D = 16
    labels = _random_labels(4, 2, D, 4, 1)
    policy = DoubleSparsity(channels=4, budget=8, labels=labels, label_bits=bits)
    layer, _, _ = _filled(50, D=D, policy=policy)
    q = torch.randn(1, 4, D)
    policy.spans(layer, q, 3)
    cache_keys = lambda: layer.policy_state["double_sparsity"]["keys"]  # noqa: E731
    for step in range(3):
        layer.update(torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D))
        policy.spans(layer, q, 3)
    layer.crop(-10)
    layer.update(torch.randn(1, 2, 5, D), torch.randn(1, 2, 5, D))  # overwrites the cropped positions
    policy.spans(layer, q, 3)
    want = layer.k_store[:, :, : layer.n].gather(-1, labels[3].view(1, 2, 1, 4).expand(1, 2, layer.n, 4))
    if bits == 16:
        assert cache_keys().shape == (1, 2, 48, 4) and torch.equal(cache_keys(), want)
        return
    packed = cache_keys()  # 4 bits: the codes and scales of the 48 tokens, dequantized, are the definition's
    codes = unpack_codes(packed.codes)[:, :, :48]
    assert packed.n == 48 and packed.codes.shape[-1] * 2 >= 48 and int(codes.min()) >= 1 and int(codes.max()) <= 15
    torch.testing.assert_close(((codes.double() - 8) * packed.scales[:, :, :48, None]), _dequantized_4bit(want))


def test_bad_arguments_are_clear_errors(tmp_path):
    labels = _random_labels(4, 2, 16, 4, 0)
    with pytest.raises(ConfigError, match="needs calibrated label channels"):
        DoubleSparsity(channels=4, budget=64)
    with pytest.raises(ConfigError, match="channels must be a positive integer"):
        DoubleSparsity(channels=0, budget=64, labels=labels)
    with pytest.raises(ConfigError, match="budget must be a positive integer"):
        DoubleSparsity(channels=4, budget=-1, labels=labels)
    with pytest.raises(ConfigError, match="label_bits must be 4"):
        DoubleSparsity(channels=4, budget=64, labels=labels, label_bits=8)
    with pytest.raises(ConfigError, match="fewer than channels=8"):
        DoubleSparsity(channels=8, budget=64, labels=labels)
    with pytest.raises(ConfigError, match="repeat a channel"):
        DoubleSparsity(channels=2, budget=64, labels=torch.tensor([[[1, 1]]]))
    with pytest.raises(ConfigError, match="integer tensor"):
        DoubleSparsity(channels=2, budget=64, labels=torch.rand(1, 1, 2))
    with pytest.raises(ConfigError, match="does not exist"):
        DoubleSparsity(channels=2, budget=64, labels=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not a Double Sparsity label file"):
        load_label_channels(tmp_path / "bad.json")
    policy = DoubleSparsity(channels=4, budget=8, labels=labels)
    layer, _, _ = _filled(50, Hkv=4, policy=policy)  # 4 KV heads, labels for 2
    with pytest.raises(ConfigError, match="calibrate on this model"):
        policy.spans(layer, torch.randn(1, 4, 16), 3)
    layer, _, _ = _filled(50, D=8, policy=policy)  # channel indices up to 15 in a head of 8
    with pytest.raises(ConfigError, match="calibrate on this model"):
        policy.spans(layer, torch.randn(1, 2, 8), 3)
    with pytest.raises(ConfigError, match="channels must be a positive integer"):
        calibrate_label_channels(tiny_model("llama"), [tokens(1, 8)], 0)


def test_calibration_ranks_channels_by_mean_abs_qk_of_the_rotated_activations(tmp_path):
    """Oracle: the rotated q and k the model's eager attention receives, |q_d k_d| averaged per head."""
    model = tiny_model("llama", seed=4)
    batches = [tokens(2, 12, seed=s) for s in range(3)]
    captured = {}

    def eager_spy(module, query, key, value, attention_mask, **kw):
        captured.setdefault(module.layer_idx, []).append((query.detach().clone(), key.detach().clone()))
        return eager(module, query, key, value, attention_mask, **kw)

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward as eager

    AttentionInterface.register("spy", eager_spy)
    AttentionMaskInterface.register("spy", eager_mask)
    model.set_attn_implementation("spy")
    with torch.no_grad():
        for ids in batches:
            model(ids, use_cache=False)
    model.set_attn_implementation("sdpa")
    cfg = model.config
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    G, D = Hq // Hkv, cfg.hidden_size // Hq
    want = []
    for layer in range(cfg.num_hidden_layers):
        imp = torch.zeros(Hkv, D, dtype=torch.float64)
        for q, k in captured[layer]:
            for h in range(Hq):
                imp[h // G] += (q[:, h].double() * k[:, h // G].double()).abs().sum(dim=(0, 1))
        want.append(imp.argsort(dim=-1, descending=True, stable=True)[:, :3])
    labels = calibrate_label_channels(model, batches, channels=3)
    assert labels.dtype == torch.int64 and labels.shape == (cfg.num_hidden_layers, Hkv, 3)
    assert torch.equal(labels, torch.stack(want))
    assert model.config._attn_implementation == "sdpa"  # restored
    save_label_channels(labels, tmp_path / "labels.json")
    assert torch.equal(load_label_channels(tmp_path / "labels.json"), labels)
    assert not list(tmp_path.glob(".*tmp*"))
    policy = DoubleSparsity(channels=2, budget=16, labels=tmp_path / "labels.json")
    assert torch.equal(policy.labels, labels[:, :, :2])


def _generate(model, ids, impl, cache=None, new=12, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, cache=cache, **kw)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_generate_with_calibrated_labels(family):
    enable()
    model = tiny_model(family, seed=1)
    labels = calibrate_label_channels(model, [tokens(4, 32, seed=7)], channels=4)
    ids = tokens(1, 30, seed=2)
    ref = _generate(model, ids, "sdpa", new=20)
    covering = PagedKVCache(model.config, policy=DoubleSparsity(channels=4, budget=50, labels=labels), page_size=8)
    assert torch.equal(_generate(model, ids, NAME, covering, new=20), ref)
    sparse = PagedKVCache(model.config, policy=DoubleSparsity(channels=4, budget=6, labels=labels), page_size=8)
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        res = model.generate(ids, max_new_tokens=6, do_sample=False, cache=sparse, output_logits=True,
                             return_dict_in_generate=True)
        dense = model.generate(ids, max_new_tokens=6, do_sample=False, cache=PagedKVCache(model.config),
                               output_logits=True, return_dict_in_generate=True)
    got, want = torch.stack(res.logits), torch.stack(dense.logits)
    assert torch.equal(got[0], want[0])  # the first token comes from the dense prefill
    assert not torch.allclose(got[1:], want[1:])
    assert sparse.read_fraction() < 0.25
