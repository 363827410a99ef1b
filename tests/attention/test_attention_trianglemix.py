"""TriangleMix inside transformers' forward and generate: the built-in Llama model and tiny random
Qwen2 / Mistral (GQA). Oracle: an attention function registered here that runs torch SDPA with the
Triangle mask built from the paper's definition in the deep layers (causal elsewhere). A covering
pattern gives the dense (SDPA) output; a real pattern changes the logits exactly as the oracle
does; the decode policy runs after the prompt; bad settings and padded batches fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.attention import NAME, Dense, PagedKVCache, Quest, TriangleMix, enable
from sparseforge.errors import ConfigError, DataError
from sparseforge.io.builtin import builtin_model_path
from tiny_models import tiny_model, tokens

ORACLE = "trianglemix_oracle"


@pytest.fixture(scope="module")
def builtin():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(builtin_model_path()), local_files_only=True)
    return model.eval()


def _register_oracle(policy: TriangleMix) -> str:
    """Registers SDPA with the Triangle mask of ``policy`` (from its definition) under ORACLE."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B, Hq, T, D = query.shape
        n, G = key.shape[2], Hq // key.shape[1]
        i = torch.arange(n - T, n).view(-1, 1)
        j = torch.arange(n).view(1, -1)
        allowed = j <= i
        horizon = kwargs.get("sliding_window")
        if horizon is not None:
            allowed &= i - j < horizon
        dense = module.layer_idx < (module.config.num_hidden_layers // 2 if policy.dense_layers is None
                                    else policy.dense_layers)
        if T > 1 and not dense:
            allowed &= (j < policy.sinks) | (i - j < policy.window) | (i >= n - policy.last)
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(G, 1), value.repeat_interleave(G, 1),
                                             attn_mask=allowed, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(ORACLE, attention)
    AttentionMaskInterface.register(ORACLE, sdpa_mask)
    return ORACLE


def _logits(model, ids, impl, cache=None):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, cache=cache, use_cache=cache is not None).logits


def _generate(model, ids, impl, cache=None, new=8, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, cache=cache, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_builtin_covering_pattern_generates_the_sdpa_tokens(builtin, dtype):
    enable()
    model = builtin.to(dtype)
    ids = torch.randint(2, 4000, (1, 150), generator=torch.Generator().manual_seed(0))
    ref = _generate(model, ids, "sdpa", new=12)
    for policy in (TriangleMix(window=150), TriangleMix(dense_layers=6, window=4), TriangleMix(last=150, window=4)):
        out = _generate(model, ids, NAME, PagedKVCache(model.config, policy=policy), new=12)
        assert torch.equal(out, ref), policy
    builtin.float()


def test_builtin_triangle_logits_equal_the_masked_sdpa_oracle(builtin):
    enable()
    policy = TriangleMix(sinks=4, window=32, last=16)  # dense_layers: half of 6
    ids = torch.randint(2, 4000, (1, 200), generator=torch.Generator().manual_seed(1))
    got = _logits(builtin, ids, NAME, PagedKVCache(builtin.config, policy=policy))
    want = _logits(builtin, ids, _register_oracle(policy))
    dense = _logits(builtin, ids, "sdpa")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    middle = slice(40, 200 - 16)  # rows whose attention the pattern cuts
    assert (got[:, middle] - dense[:, middle]).abs().amax() > 1e-2
    # the generated tokens follow the oracle too (decode steps are dense in both)
    out = _generate(builtin, ids, NAME, PagedKVCache(builtin.config, policy=policy), new=10)
    assert torch.equal(out, _generate(builtin, ids, ORACLE, new=10))


@pytest.mark.parametrize("family", ["qwen2", "mistral", "llama"])
def test_tiny_gqa_models_follow_the_oracle_and_cover_to_dense(family):
    enable()
    model = tiny_model(family, seed=1)
    ids = tokens(1, 40, seed=2)
    policy = TriangleMix(sinks=2, window=6, last=5, dense_layers=1)
    got = _logits(model, ids, NAME, PagedKVCache(model.config, policy=policy, page_size=8))
    torch.testing.assert_close(got, _logits(model, ids, _register_oracle(policy)), rtol=1e-4, atol=1e-5)
    ref = _generate(model, ids, "sdpa", new=16)
    out = _generate(model, ids, NAME, PagedKVCache(model.config, policy=TriangleMix(window=40), page_size=8), new=16)
    assert torch.equal(out, ref)


def test_mistral_sliding_window_is_kept_in_dense_and_triangle_layers():
    enable()
    model = tiny_model("mistral", seed=4)
    model.config.sliding_window = 12
    ids = tokens(1, 40, seed=5)
    policy = TriangleMix(sinks=3, window=8, last=6, dense_layers=1)
    got = _logits(model, ids, NAME, PagedKVCache(model.config, policy=policy, page_size=8))
    torch.testing.assert_close(got, _logits(model, ids, _register_oracle(policy)), rtol=1e-4, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(sinks=st.integers(0, 10), window=st.integers(1, 40), last=st.integers(0, 45), dense_layers=st.integers(0, 2),
       n=st.integers(2, 60), seed=st.integers(0, 100))
def test_any_setting_follows_the_oracle(sinks, window, last, dense_layers, n, seed):
    enable()
    model = tiny_model("qwen2", seed=seed % 3)
    ids = tokens(1, n, seed=seed)
    policy = TriangleMix(sinks=sinks, window=window, last=last, dense_layers=dense_layers)
    got = _logits(model, ids, NAME, PagedKVCache(model.config, policy=policy, page_size=8))
    torch.testing.assert_close(got, _logits(model, ids, _register_oracle(policy)), rtol=1e-4, atol=1e-5)


def test_decode_policy_runs_after_the_prompt(builtin):
    enable()
    ids = torch.randint(2, 4000, (1, 200), generator=torch.Generator().manual_seed(3))
    cache = PagedKVCache(builtin.config, policy=TriangleMix(decode_policy=Quest(budget=64, dense_layers=0)))
    _generate(builtin, ids, NAME, cache, new=4)
    assert cache.read_fraction() < 0.5  # Quest read 64 of ~200 tokens per step
    dense = PagedKVCache(builtin.config, policy=TriangleMix())
    _generate(builtin, ids, NAME, dense, new=4)
    assert dense.read_fraction() == 1.0


def test_padded_batch_is_a_clear_error():
    enable()
    model = tiny_model("llama", seed=3)
    ids = tokens(2, 20, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with pytest.raises(DataError, match="unpadded"):
        _generate(model, ids, NAME, PagedKVCache(model.config, policy=TriangleMix()), new=2, attention_mask=mask,
                  pad_token_id=0)


@pytest.mark.parametrize("kw,match", [(dict(sinks=-1), "sinks"), (dict(window=0), "window"), (dict(last=-2), "last"),
                                      (dict(dense_layers=-1), "dense_layers"), (dict(window=2.5), "window"),
                                      (dict(decode_policy="quest"), "decode_policy"),
                                      (dict(decode_policy=TriangleMix()), "decode_policy")])
def test_bad_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        TriangleMix(**kw)


def test_defaults_follow_the_reference_and_the_decode_policy_page_check():
    p = TriangleMix()
    assert (p.sinks, p.window, p.last) == (8, 512, 128)  # MInference tri_mix: n_init, n_local, n_last
    assert [p.triangle_layer(i, 32) for i in (15, 16)] == [False, True]  # starting_layer=16 of 32
    assert p.decoding() == Dense()
    with pytest.raises(ConfigError, match="multiple of the page size"):
        PagedKVCache(num_layers=2, policy=TriangleMix(decode_policy=Quest(budget=40)), page_size=16)


def test_module_doctests():
    import doctest

    import sparseforge.attention.trianglemix as trianglemix
    import sparseforge.ops.prefill_attention as ops

    for module in (trianglemix, ops):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.mark.parametrize("path", ["scalar", "avx512_bf16", "amx"])
def test_dense_bf16_layers_run_our_kernel_only_on_amx(builtin, path, monkeypatch):
    """The documented rule: over a bfloat16 cache, dense layers take our kernel when its bf16 compute
    path is amx, torch's SDPA otherwise; Triangle layers always take our kernel."""
    import sparseforge.ops.prefill_attention as ops

    if not kernels.native().bf16_path_supported(path):
        monkeypatch.setenv("SPARSEFORGE_BF16_PATH", path)
        with pytest.raises(ConfigError, match=path):
            TriangleMix.dense_bf16_native()
        return
    enable()
    monkeypatch.setenv("SPARSEFORGE_BF16_PATH", path)
    calls = []
    real = ops.attend_prefill
    monkeypatch.setattr(ops, "attend_prefill", lambda *a, **kw: calls.append(kw["window"] >= a[3]) or real(*a, **kw))
    model = builtin.to(torch.bfloat16)
    try:
        ids = torch.randint(2, 4000, (1, 100), generator=torch.Generator().manual_seed(4))
        policy = TriangleMix(sinks=4, window=16, last=8, dense_layers=2)
        got = _logits(model, ids, NAME, PagedKVCache(model.config, policy=policy))
        want = _logits(model, ids, _register_oracle(policy))
    finally:
        builtin.float()
    layers = model.config.num_hidden_layers
    assert calls.count(False) == layers - 2  # every Triangle layer
    assert calls.count(True) == (2 if path == "amx" else 0)  # dense layers: ours on amx only
    assert TriangleMix.dense_bf16_native() == (path == "amx")
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.1)  # bf16 model, bf16 attention
