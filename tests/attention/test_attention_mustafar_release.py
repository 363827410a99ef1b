"""Mustafar(release_dense=True): the dense rows of compressed tokens are given back to the system
(``release_rows``: the memory really leaves the process), the generated tokens do not change, the
cache reports the bytes it holds, and every use that would read the freed rows raises instead."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparseforge.attention import Mustafar, PagedKVCache, enable
from sparseforge.attention.cache import huge_page_empty, release_rows
from sparseforge.errors import ConfigError, DataError


def _kept_rows(x: torch.Tensor, upto: int) -> int:
    """Most rows of [0, upto) of any head that still read nonzero (release_rows keeps the OS pages a head
    shares with its neighbour or with row upto: at most a page's rows at each end)."""
    return int((x[:, :, :upto] != 0).any(-1).sum(-1).max())


def _edge_rows(x: torch.Tensor) -> int:
    return 2 * -(-4096 // (x.shape[-1] * x.element_size()))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("alloc", ["torch", "huge_page_empty"])  # private memory / the cache's shared mapping
def test_release_rows_gives_the_memory_back_and_keeps_the_rest(alloc):
    shape = (2, 2, 8192, 256)  # 32 MB, every head 8 MB
    x = torch.empty(shape) if alloc == "torch" else huge_page_empty(shape, torch.float32)
    x.fill_(1.5)
    before = _rss_bytes()
    release_rows(x, 6144)  # three quarters of every head's rows
    freed = before - _rss_bytes()
    assert freed >= 0.9 * 24 * 2**20  # ~24 MB left the process
    assert _kept_rows(x, 6144) <= _edge_rows(x)  # freed rows read zeros, but the unaligned edge pages
    assert bool((x[:, :, 6144:] == 1.5).all())  # the rest is untouched


def _model(attn="sparseforge"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(enable() if attn == "sparseforge" else attn)
    return model


def _generate(model, policy, ids, new=10):
    cache = PagedKVCache(model.config, policy=policy)
    out = model.generate(ids, cache=cache, max_new_tokens=new, do_sample=False)
    return out, cache


def test_generate_is_unchanged_and_the_cache_holds_less():
    model = _model()
    ids = torch.randint(0, 97, (1, 800))
    kept, kept_cache = _generate(model, Mustafar(0.7, recent=256), ids)
    freed, freed_cache = _generate(model, Mustafar(0.7, recent=256, release_dense=True), ids)
    assert torch.equal(kept, freed)
    layer = freed_cache.layers[0]
    assert layer.released == 512  # (809 - 256) // 256 whole chunks compressed, their rows freed
    for store in (layer.k_store, layer.v_store):
        assert _kept_rows(store, 512) <= _edge_rows(store)  # freed (but the pages shared at the edges)
    n, (B, H, _, D) = layer.n, layer.k_store.shape
    compressed = layer.policy.state_bytes(layer)
    assert compressed > 0
    assert freed_cache.kv_bytes() == 2 * (2 * (n - 512) * B * H * D * 4 + compressed)
    assert kept_cache.kv_bytes() == 2 * (2 * n * B * H * D * 4 + compressed)  # the dense copy kept


def test_uses_that_would_read_freed_rows_raise():
    model = _model()
    ids = torch.randint(0, 97, (1, 600))
    _, cache = _generate(model, Mustafar(0.7, recent=256, release_dense=True), ids, new=2)
    layer = cache.layers[0]
    assert layer.released == 256
    k = torch.randn(1, 2, 3, 16)
    with pytest.raises(DataError, match="single-token decode steps only"):
        layer.update(k, k)  # a multi-token chunk would attend over the freed rows
    with pytest.raises(DataError, match="cannot be cropped to 100"):
        cache.crop(100 - layer.n)
    with pytest.raises(DataError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))
    model.config._attn_implementation = "sdpa"  # another attention implementation would read zeros
    with pytest.raises(ConfigError, match="attn_implementation='sparseforge'"):
        layer.update(k[:, :, :1], k[:, :, :1])


def test_release_needs_the_models_config():
    model = _model()
    cache = PagedKVCache(num_layers=2, policy=Mustafar(0.7, recent=256, release_dense=True))
    with pytest.raises(ConfigError, match="PagedKVCache\\(model.config"):
        model.generate(torch.randint(0, 97, (1, 600)), cache=cache, max_new_tokens=2, do_sample=False)


def test_release_dense_must_be_a_bool():
    with pytest.raises(ConfigError, match="release_dense"):
        Mustafar(release_dense=1)
