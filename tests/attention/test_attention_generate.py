"""``model.generate`` with attn_implementation="sparseforge" and a PagedKVCache, end to end: the
built-in Llama model and tiny random Qwen2 / Mistral (GQA) give the dense output token for token for
Dense and for budgets covering the context; sparse budgets really change the attention; batches with
left padding; a cache reused across batch sizes and decoding without the cache fail clearly."""

from __future__ import annotations

import pytest
import torch
import transformers

from sparseforge.attention import NAME, Dense, Mustafar, PagedKVCache, Quest, SnapKV, StreamingLLM, enable
from sparseforge.builtin import builtin_model_path
from sparseforge.errors import DataError, ModelError
from tiny_models import tiny_model, tokens


@pytest.fixture(scope="module")
def builtin():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(builtin_model_path()), local_files_only=True)
    return model.eval()


def _generate(model, ids, impl, cache=None, new=12, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, cache=cache, **kw)


def _covering_policies(context):
    return [Dense(), Quest(budget=-(-context // 16) * 16, dense_layers=0), StreamingLLM(sinks=4, window=context),
            StreamingLLM(sinks=4, window=context, positions="cache"), SnapKV(window=8, capacity=context),
            Mustafar(recent=context)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_builtin_model_dense_and_covering_budgets_match_sdpa(builtin, dtype):
    enable()
    model = builtin.to(dtype)
    ids = torch.randint(2, 4000, (1, 150), generator=torch.Generator().manual_seed(0))
    ref = _generate(model, ids, "sdpa", new=16)
    for policy in _covering_policies(150 + 16):
        out = _generate(model, ids, NAME, PagedKVCache(model.config, policy=policy), new=16)
        assert torch.equal(out, ref), policy
    builtin.float()


def test_builtin_model_sparse_budgets_change_the_attention(builtin):
    """A budget far below the context must not silently run dense: logits move."""
    enable()
    ids = torch.randint(2, 4000, (1, 300), generator=torch.Generator().manual_seed(1))
    model = builtin
    outs = {}
    for name, policy in [("dense", Dense()), ("quest", Quest(budget=32)), ("streaming", StreamingLLM(4, 28)),
                         ("snapkv", SnapKV(window=16, capacity=48)),
                         ("streaming_cache", StreamingLLM(4, 28, positions="cache")),
                         ("mustafar", Mustafar(sparsity=0.7, recent=16))]:
        model.set_attn_implementation(NAME)
        cache = PagedKVCache(model.config, policy=policy)
        with torch.no_grad():
            res = model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache, output_logits=True,
                                 return_dict_in_generate=True)
        outs[name] = torch.stack(res.logits)  # (steps, 1, vocab)
    assert torch.equal(outs["dense"][0], outs["quest"][0])  # the first token comes from the dense prefill
    assert not torch.allclose(outs["dense"][1:], outs["quest"][1:])
    assert not torch.allclose(outs["dense"][1:], outs["streaming"][1:])
    assert not torch.allclose(outs["dense"][1:], outs["snapkv"][1:])
    assert not torch.allclose(outs["streaming"][1:], outs["streaming_cache"][1:])  # the sinks' positions matter
    assert not torch.allclose(outs["dense"][1:], outs["mustafar"][1:])


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_tiny_gqa_models_match_sdpa(family):
    enable()
    model = tiny_model(family, seed=1)
    ids = tokens(1, 30, seed=2)
    ref = _generate(model, ids, "sdpa", new=20)
    for policy in _covering_policies(50):
        out = _generate(model, ids, NAME, PagedKVCache(model.config, policy=policy, page_size=8), new=20)
        assert torch.equal(out, ref), policy


def test_left_padded_batch_matches_sdpa():
    enable()
    model = tiny_model("llama", seed=3)
    ids = tokens(2, 20, seed=4)
    mask = torch.ones_like(ids)
    ids[1, :6] = 0
    mask[1, :6] = 0  # row 1 is 14 tokens, padded on the left
    ref = _generate(model, ids, "sdpa", new=10, attention_mask=mask, pad_token_id=0)
    out = _generate(model, ids, NAME, PagedKVCache(model.config), new=10, attention_mask=mask, pad_token_id=0)
    assert torch.equal(out, ref)


def test_cache_reused_across_batch_sizes_fails():
    enable()
    model = tiny_model("qwen2")
    cache = PagedKVCache(model.config)
    _generate(model, tokens(2, 10), NAME, cache, new=2)
    with pytest.raises(DataError, match="a cache serves one batch"):
        _generate(model, tokens(1, 10), NAME, cache, new=2)


def test_decoding_without_a_paged_cache_fails():
    enable()
    model = tiny_model("llama")
    with pytest.raises(ModelError, match="PagedKVCache"):
        _generate(model, tokens(1, 10), NAME, None, new=3)


def test_beam_search_matches_sdpa():
    """Beam search reorders the cache rows every step (reorder_cache)."""
    enable()
    model = tiny_model("llama", seed=5)
    ids = tokens(1, 12, seed=1)
    ref = _generate(model, ids, "sdpa", new=8, num_beams=3)
    out = _generate(model, ids, NAME, PagedKVCache(model.config), new=8, num_beams=3)
    assert torch.equal(out, ref)


def test_read_fraction_reports_what_the_policy_read(builtin):
    enable()
    ids = torch.randint(2, 4000, (1, 200), generator=torch.Generator().manual_seed(2))
    fractions = {}
    for name, policy in [("dense", Dense()), ("streaming", StreamingLLM(4, 60)), ("quest", Quest(budget=64, dense_layers=0))]:
        cache = PagedKVCache(builtin.config, policy=policy)
        assert cache.read_fraction() != cache.read_fraction()  # nan before decoding
        _generate(builtin, ids, NAME, cache, new=5)
        fractions[name] = cache.read_fraction()
    steps = range(201, 205)  # 4 decode steps after the 200-token prefill, each with its own token cached
    assert fractions["dense"] == 1.0
    assert abs(fractions["streaming"] - 64 * 4 / sum(steps)) < 1e-9
    # Quest: 3 complete pages of 16 plus the newest, partial page (tokens 192..n-1)
    assert abs(fractions["quest"] - sum(3 * 16 + n - 192 for n in steps) / sum(steps)) < 1e-9
