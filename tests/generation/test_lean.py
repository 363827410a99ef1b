"""The lean decode path gives the greedy tokens of plain transformers ``generate``, dense and sparse."""

from __future__ import annotations

import copy

import pytest
import torch

import sparseforge as sf
from sparseforge.errors import ConfigError
from sparseforge.generation.fuse import FusedSlice
from sparseforge.generation.lean import LeanConfig, cache_length, lean_generate, lean_generate_kwargs
from sparseforge.nn.sparse_linear import SparseLinear
from sparseforge.runtime.compress import compress_
from tiny_models import tiny_model, tokens

NEW = 24


def _models():
    dense = tiny_model("llama", seed=3)
    sparse = copy.deepcopy(dense)
    sf.sparsify_(sparse, sf.SparsifyConfig(method="magnitude", pattern="2:4"), progress=False)
    compress_(sparse, format="rule")
    assert any(isinstance(m, SparseLinear) for m in sparse.modules())
    return {"dense": dense, "sparse 2:4": sparse}


def _greedy(model, ids, lean):
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        return model.generate(ids, **kw) if lean is None else lean_generate(model, ids, lean, **kw)


@pytest.mark.parametrize("lean", [LeanConfig(fuse="always"), LeanConfig(fuse="always", static_cache=True),
                                  LeanConfig(fuse=False, static_cache=True)], ids=["fused", "fused+static", "static"])
def test_greedy_tokens_equal_plain_generate(lean):
    for name, model in _models().items():
        ids = tokens(1, 6, seed=1)
        expected = _greedy(model, ids, None)
        got = _greedy(model, ids, lean)
        assert got.shape == (1, 6 + NEW)
        assert torch.equal(got, expected), name
        assert isinstance(model.model.layers[0].self_attn.q_proj, FusedSlice) == (lean.fuse == "always")


def test_auto_fusion_fuses_sparse_groups_and_leaves_dense_ones_in_eager_mode():
    models = _models()
    ids = tokens(1, 6, seed=1)
    for model in models.values():
        _greedy(model, ids, LeanConfig())
    assert not isinstance(models["dense"].model.layers[0].self_attn.q_proj, FusedSlice)
    assert isinstance(models["sparse 2:4"].model.layers[0].self_attn.q_proj, FusedSlice)
    assert isinstance(models["sparse 2:4"].model.layers[0].mlp.up_proj, FusedSlice)


def test_lean_path_generates_from_a_batch_of_prompts_like_generate():
    model = _models()["sparse 2:4"]
    ids = tokens(3, 5, seed=2)
    assert torch.equal(_greedy(model, ids, LeanConfig()), _greedy(copy.deepcopy(model), ids, None))


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_greedy_tokens():
    for name, model in _models().items():
        ids = tokens(1, 6, seed=1)
        expected = _greedy(model, ids, None)
        assert torch.equal(_greedy(model, ids, LeanConfig(compile=True)), expected), name


def test_static_cache_is_sized_in_buckets_within_the_context():
    model = tiny_model("llama")  # context 64
    kw = lean_generate_kwargs(model, 20, LeanConfig(static_cache=True, cache_bucket=16))
    assert kw["cache_implementation"] == "static" and kw["max_cache_len"] == 32
    assert lean_generate_kwargs(model, 60, LeanConfig(static_cache=True, cache_bucket=48))["max_cache_len"] == 64
    assert "cache_implementation" not in lean_generate_kwargs(model, 20, LeanConfig())  # eager: the dynamic cache
    assert cache_length(1, 256) == 256 and cache_length(257, 256) == 512 and cache_length(300, 256, limit=280) == 300


@pytest.mark.parametrize("kwargs", [dict(fuse="sometimes"), dict(cache_bucket=0), dict(cache_bucket=2.5), dict(compile=True, static_cache=False)])
def test_bad_lean_configs_are_refused(kwargs):
    with pytest.raises(ConfigError):
        LeanConfig(**kwargs)


def test_lean_generate_needs_max_new_tokens():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        lean_generate(tiny_model("llama"), tokens(1, 4), LeanConfig())
