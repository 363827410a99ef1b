"""The MQAR generator (sparseforge.data.mqar): layout invariants as property tests, and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.data.mqar import IGNORE, MQARVocab, make_batch
from sparseforge.errors import ConfigError


@st.composite
def settings_(draw):
    vocab = MQARVocab(filler=draw(st.integers(1, 8)), keys=draw(st.integers(2, 40)), values=draw(st.integers(1, 40)))
    pairs = draw(st.integers(1, vocab.keys))
    context = draw(st.integers(1 + 2 * pairs, 1 + 2 * pairs + 60))
    queries = draw(st.integers(1, pairs))
    batch = draw(st.integers(1, 4))
    stretch = draw(st.sampled_from([1.0, 1.0, 3.5, 16.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return vocab, batch, context, pairs, queries, stretch, seed


def _batch(vocab, batch, context, pairs, queries, stretch, seed):
    return make_batch(batch, context, pairs, queries, vocab, generator=torch.Generator().manual_seed(seed), stretch=stretch)


@settings(max_examples=60, deadline=None)
@given(settings_())
def test_layout_invariants(s):
    vocab, B, C, P, Q, stretch, seed = s
    b = _batch(*s)
    T = C + 2 * Q
    assert b.ids.shape == b.labels.shape == b.positions.shape == (B, T)
    assert b.context == C and b.queries == Q
    assert int(b.ids.min()) >= 0 and int(b.ids.max()) < vocab.size
    for row in range(B):
        ids, labels = b.ids[row].tolist(), b.labels[row].tolist()
        assert ids[0] == vocab.bos and vocab.bos not in ids[1:]
        ctx = ids[:C]
        key_at = [i for i, t in enumerate(ctx) if vocab.first_key <= t < vocab.first_value]
        keys = [ctx[i] for i in key_at]
        assert len(keys) == P and len(set(keys)) == P  # P pairs, keys distinct
        for i in key_at:  # every key is followed by a value; values only right after keys
            assert i + 1 < C and ctx[i + 1] >= vocab.first_value
        value_at = [i for i, t in enumerate(ctx) if t >= vocab.first_value]
        assert value_at == [i + 1 for i in key_at]
        others = [t for i, t in enumerate(ctx) if i and i not in key_at and i not in value_at]
        assert all(1 <= t <= vocab.filler for t in others) and len(others) == C - 1 - 2 * P
        query_keys = ids[C::2]
        assert len(query_keys) == Q and len(set(query_keys)) == Q
        for j, k in enumerate(query_keys):
            pos = C + 2 * j
            assert ctx.count(k) == 1  # the answer is present exactly once before the query
            value = ctx[ctx.index(k) + 1]
            assert ids[pos + 1] == value and labels[pos] == value
            assert ids[:pos].count(k) == 1  # and no earlier query repeats the key
        assert [i for i, t in enumerate(labels) if t != IGNORE] == list(range(C, T, 2))


@settings(max_examples=60, deadline=None)
@given(settings_())
def test_positions(s):
    vocab, B, C, P, Q, stretch, seed = s
    b = _batch(*s)
    steps = b.positions.diff(dim=1)
    assert bool((b.positions[:, 0] == 0).all()) and bool((steps >= 1).all())
    assert bool((steps[:, C - 1:] == 1).all())  # the query part is consecutive (and follows the context)
    pair_start = (b.ids[:, :C] >= vocab.first_key) & (b.ids[:, :C] < vocab.first_value)
    assert bool((steps[:, :C - 1][pair_start[:, :C - 1]] == 1).all())  # a key and its value are adjacent
    if stretch == 1.0:
        assert torch.equal(b.positions, torch.arange(C + 2 * Q).expand(B, -1))
    else:
        assert int(b.positions[:, C - 1].max()) <= stretch * C


def test_deterministic_per_generator_and_random_across_seeds():
    a = make_batch(3, 100, 20, 10, generator=torch.Generator().manual_seed(5), stretch=4.0)
    b = make_batch(3, 100, 20, 10, generator=torch.Generator().manual_seed(5), stretch=4.0)
    c = make_batch(3, 100, 20, 10, generator=torch.Generator().manual_seed(6), stretch=4.0)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.positions, b.positions)
    assert not torch.equal(a.ids, c.ids)


def test_pairs_spread_over_the_whole_context():
    b = make_batch(64, 1024, 16, 4, generator=torch.Generator().manual_seed(0))
    at = ((b.ids[:, :1024] >= MQARVocab().first_key) & (b.ids[:, :1024] < MQARVocab().first_value)).nonzero()[:, 1].float()
    assert at.mean().item() == pytest.approx(512, rel=0.1)
    assert (at < 128).any() and (at > 896).any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(context=10, pairs=5, queries=1), "context of at least 11"),
    (dict(context=400, pairs=129, queries=1), "distinct keys"),
    (dict(context=64, pairs=4, queries=5), "exceed the 4 pairs"),
    (dict(context=64, pairs=0, queries=0), "pairs must be a positive integer"),
    (dict(context=64, pairs=4, queries=2, stretch=0.5), "stretch must be >= 1"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_batch(2, vocab=MQARVocab(), **kwargs)


def test_bad_vocab():
    with pytest.raises(ConfigError, match="keys must be a positive integer"):
        MQARVocab(keys=0)
