"""The shipped MQAR model: it loads from the package, recalls on held-out examples with dense attention,
and its decode path (PagedKVCache + the sparseforge attention) agrees with a plain forward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from sparseforge.attention import Dense, PagedKVCache, Quest, StreamingLLM
from sparseforge.data.mqar import make_batch
from sparseforge.errors import ConfigError, ModelError
from sparseforge.evaluation.mqar import answer, load_mqar_model, mqar_model_path, mqar_vocab, prefill, recall
from tiny_models import tiny_model

HELD_OUT = 10_007  # generator seed for test batches (training draws from seed 0's stream)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_mqar_model()


def test_shipped_files_are_small_and_complete():
    root = mqar_model_path()
    assert (root / "model.safetensors").stat().st_size < 4 << 20
    assert (root / "README.md").read_text().startswith("# MQAR recall model")


def test_vocab_matches_the_model(model):
    vocab = mqar_vocab(model)
    assert vocab.size == model.config.vocab_size
    assert model.config._attn_implementation == "sparseforge"


def test_dense_recall_on_held_out_examples(model):
    b = make_batch(4, 256, 32, 16, mqar_vocab(model), generator=torch.Generator().manual_seed(HELD_OUT))
    acc = recall(model, b, Dense()).float().mean().item()
    assert acc >= 0.95, f"dense recall {acc:.3f} on held-out examples at 256 tokens"


def test_decode_answers_equal_a_full_forward(model):
    """The query logits from decode steps on the cache equal those of one dense forward pass."""
    b = make_batch(2, 192, 24, 8, mqar_vocab(model), generator=torch.Generator().manual_seed(HELD_OUT + 1))
    with torch.no_grad():
        logits = model(input_ids=b.ids).logits  # (B, T, V) with the prefill (SDPA) path
    q = torch.arange(b.context, b.ids.shape[1], 2)
    expected = logits[:, q].argmax(-1) == b.labels[:, q]
    assert torch.equal(recall(model, b, Dense()), expected)


def test_budget_covering_the_context_equals_dense(model):
    b = make_batch(2, 160, 24, 8, mqar_vocab(model), generator=torch.Generator().manual_seed(HELD_OUT + 2))
    dense = recall(model, b, Dense())
    base = prefill(model, b)
    for policy in (Quest(budget=256, page_size=16, dense_layers=0), StreamingLLM(sinks=4, window=252)):
        cache = copy.deepcopy(base)
        cache.set_policy(policy)
        assert torch.equal(answer(model, b, cache), dense), policy


def test_streaming_window_loses_what_it_cannot_see(model):
    """Pairs only in the middle of a long context: a small window cannot answer, dense can."""
    b = make_batch(2, 1024, 32, 16, mqar_vocab(model), generator=torch.Generator().manual_seed(HELD_OUT + 3))
    dense = recall(model, b, Dense()).float().mean().item()
    small = recall(model, b, StreamingLLM(sinks=4, window=60)).float().mean().item()
    assert dense >= 0.9 and small <= 0.3, (dense, small)


def test_bad_use(model):
    b = make_batch(1, 64, 8, 4, mqar_vocab(model), generator=torch.Generator().manual_seed(0), stretch=4.0)
    with pytest.raises(ConfigError, match="stretch"):
        recall(model, b)
    b = make_batch(1, 64, 8, 4, mqar_vocab(model), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="the cache holds 0 tokens"):
        answer(model, b, PagedKVCache(model.config))


def test_not_an_mqar_model():
    with pytest.raises(ModelError, match="not an MQAR model"):
        mqar_vocab(tiny_model("llama"))
