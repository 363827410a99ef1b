"""Token choice of the native engine: transformers' warpers reproduced, top-k / top-p invariants, seeds, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError
from sparseforge.generation.sampling import Sampling, TokenPicker, filter_logits


def _logits(seed: int, vocab: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _transformers_filtered(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.unsqueeze(0)  # (1, vocab)
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(s.temperature)(ids, scores)
    if s.top_k:
        scores = TopKLogitsWarper(s.top_k)(ids, scores)
    if s.top_p is not None and s.top_p < 1:
        scores = TopPLogitsWarper(s.top_p)(ids, scores)
    return scores[0]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 300), temperature=st.floats(0.1, 3.0),
       top_k=st.one_of(st.none(), st.integers(1, 400)), top_p=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_filtering_equals_transformers_warpers(seed, vocab, temperature, top_k, top_p):
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    logits = _logits(seed, vocab)
    assert torch.equal(filter_logits(logits, s), _transformers_filtered(logits, s))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 300), k=st.integers(1, 300))
def test_top_k_keeps_the_k_largest(seed, vocab, k):
    logits = _logits(seed, vocab)  # continuous: no ties
    kept = torch.isfinite(filter_logits(logits, Sampling(temperature=1.0, top_k=k)))
    assert int(kept.sum()) == min(k, vocab)
    assert logits[kept].min() > logits[~kept].max() if (~kept).any() else True


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 300), p=st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_most_likely_set_above_p(seed, vocab, p):
    logits = _logits(seed, vocab)
    kept = torch.isfinite(filter_logits(logits, Sampling(temperature=1.0, top_p=p)))
    probs = logits.double().softmax(-1)
    assert kept[probs.argmax()]
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max()  # the most likely tokens
    mass = float(probs[kept].sum())
    assert mass >= p - 1e-5
    assert mass - float(probs[kept].min()) < p + 1e-5  # without its least likely token the set falls below p


def test_picks_follow_the_seed_and_the_probabilities():
    logits = torch.tensor([0.0, math.log(3.0), -math.inf])  # probabilities 1/4, 3/4, 0
    picker = TokenPicker(Sampling(temperature=1.0, seed=5))
    draws = [picker(logits) for _ in range(4000)]
    assert 2 not in draws
    assert abs(draws.count(1) / 4000 - 0.75) < 0.03
    again = TokenPicker(Sampling(temperature=1.0, seed=5))
    assert [again(logits) for _ in range(4000)] == draws
    state = torch.random.get_rng_state()
    TokenPicker(Sampling(temperature=1.0, seed=9))(logits)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone


def test_greedy_is_argmax():
    logits = _logits(1, 50)
    assert TokenPicker(Sampling())(logits) == int(logits.argmax())


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(seed="1"), "seed"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Sampling(**kwargs)
