"""Mustafar's compressed tokens follow a crop: chunks holding cropped (and later replaced) tokens are
dropped and recompressed from the cache, so decoding after crop + append equals decoding a cache
filled with the final tokens from the start (the stale-state bug: the old chunks were kept whenever
the cache had grown back past them before the next decode step)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.attention import Mustafar, PagedKVCache
from decode_oracles import decode_one


def _layer(k, v, policy):
    cache = PagedKVCache(num_layers=4, page_size=16, policy=policy)
    cache.update(k, v, 3)
    return cache.layers[3]


def _kv(n, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, D, generator=g), torch.randn(1, 2, n, D, generator=g)


def _decoded(n=600):
    """A layer of n random tokens under Mustafar(0.5, recent=16) after one decode step."""
    policy = Mustafar(sparsity=0.5, recent=16)
    k, v = _kv(n)
    layer = _layer(k, v, policy)
    q = torch.randn(1, 4, 16)
    decode_one(layer, q)
    return policy, layer, k, v, q


def test_crop_then_regrow_past_the_compressed_tokens_recompresses_them():
    policy, layer, k, v, q = _decoded()
    assert layer.policy_state["mustafar"]["done"] == 512
    layer.crop(-200)  # 400 tokens left: the chunk [256, 512) now holds tokens that will be replaced
    k2, v2 = _kv(200, seed=1)
    layer.update(k2, v2)  # back to 600 tokens, past the 512 compressed before the crop
    got = decode_one(layer, q)
    fresh = _layer(torch.cat([k[:, :, :400], k2], 2), torch.cat([v[:, :, :400], v2], 2), policy)
    want = decode_one(fresh, q)
    assert layer.policy_state["mustafar"]["done"] == 512
    torch.testing.assert_close(layer.policy_state["mustafar"]["kvals"], fresh.policy_state["mustafar"]["kvals"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_crop_within_the_recent_window_keeps_the_compressed_chunks():
    _, layer, _, _, q = _decoded()
    kept = layer.policy_state["mustafar"]["kvals"]
    layer.crop(-50)  # 550 tokens: every compressed token (< 512) is untouched
    decode_one(layer, q)
    assert layer.policy_state["mustafar"]["done"] == 512 and layer.policy_state["mustafar"]["kvals"] is kept


@settings(max_examples=15, deadline=None)
@given(n=st.integers(300, 900), cut=st.integers(1, 700), grow=st.integers(0, 700), seed=st.integers(0, 1000))
def test_decode_after_any_crop_and_append_equals_a_fresh_cache(n, cut, grow, seed):
    cut = min(cut, n - 1)
    policy = Mustafar(sparsity=0.7, recent=32)
    k, v = _kv(n, seed=seed)
    layer = _layer(k, v, policy)
    q = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(seed))
    decode_one(layer, q)
    layer.crop(-cut)
    if grow:
        k2, v2 = _kv(grow, seed=seed + 1)
        layer.update(k2, v2)
        k = torch.cat([k[:, :, : n - cut], k2], 2)
        v = torch.cat([v[:, :, : n - cut], v2], 2)
    else:
        k, v = k[:, :, : n - cut], v[:, :, : n - cut]
    got = decode_one(layer, q)
    want = decode_one(_layer(k, v, policy), q)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("cut", [50, 250])
def test_crop_to_below_one_chunk_drops_everything(cut):
    _, layer, _, _, _ = _decoded(300)
    assert layer.policy_state["mustafar"]["done"] == 256
    layer.crop(-cut)
    decode_one(layer, torch.randn(1, 4, 16))
    assert layer.policy_state["mustafar"]["done"] == 0 and layer.policy_state["mustafar"]["kvals"].shape[2] == 0
