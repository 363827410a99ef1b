"""Multi-query associative recall (MQAR): key-value pairs scattered over a context, then queries.

The task of Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language Models"
(2023; HazyResearch/zoology ``zoology/data/multiquery_ar.py``), laid out so that a KV cache decides
the answer: every query comes after the whole context, so a decode step must find one token far back.

Vocabulary (:class:`MQARVocab`): id 0 is the start token, then ``filler`` filler ids, ``keys`` key
ids and ``values`` value ids, disjoint. One example of context length ``C`` with ``P`` pairs and
``Q`` queries is ``C + 2 Q`` tokens::

    [BOS] f f k1 v1 f k2 v2 f f ... f   |   k2 v2 k1 v1 ...
    <--------- context (C tokens) ----->    <- Q queries ->

* the context holds ``P`` adjacent ``(key, value)`` pairs at uniformly random places among filler
  tokens; the keys of an example are distinct, values are drawn with replacement;
* the query part repeats ``Q`` of those pairs (distinct keys, random order), each as ``key value``;
  the label at a query key's position is its value (everything else is -100, ignored), so the
  model must predict the value from the one earlier occurrence of the key;
* ``stretch > 1`` (training only) spreads the position ids: random gaps are added between the
  context's units (a pair or a filler token, never inside a pair), so that a short sequence shows
  the model the relative distances of a context up to ``stretch`` times longer.

Example:
    >>> import torch
    >>> from sparseforge.data.mqar import MQARVocab, make_batch
    >>> b = make_batch(2, context=32, pairs=4, queries=3, vocab=MQARVocab(), generator=torch.Generator().manual_seed(0))
    >>> b.ids.shape, b.context, int((b.labels >= 0).sum())
    (torch.Size([2, 38]), 32, 6)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from sparseforge.errors import ConfigError

__all__ = ["MQARVocab", "MQARBatch", "make_batch", "IGNORE"]

IGNORE = -100  # label of a position without a target (torch's cross-entropy ignore_index)


@dataclass(frozen=True)
class MQARVocab:
    """Token ids: 0 = start, ``[1, 1 + filler)`` filler, then ``keys`` key ids, then ``values`` value ids."""

    filler: int = 32
    keys: int = 128
    values: int = 128

    def __post_init__(self):
        for name in ("filler", "keys", "values"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"MQARVocab: {name} must be a positive integer, got {value!r}")

    @property
    def bos(self) -> int:
        return 0

    @property
    def first_key(self) -> int:
        return 1 + self.filler

    @property
    def first_value(self) -> int:
        return self.first_key + self.keys

    @property
    def size(self) -> int:
        return self.first_value + self.values

    def is_key(self, ids: Tensor) -> Tensor:
        return (ids >= self.first_key) & (ids < self.first_value)

    def is_value(self, ids: Tensor) -> Tensor:
        return ids >= self.first_value


@dataclass(frozen=True)
class MQARBatch:
    """``ids``/``labels``/``positions`` int64 ``(B, context + 2 * queries)``; queries start at ``context``."""

    ids: Tensor
    labels: Tensor
    positions: Tensor
    context: int
    queries: int


def _check(batch: int, context: int, pairs: int, queries: int, vocab: MQARVocab, stretch: float) -> None:
    for name, value in (("batch", batch), ("context", context), ("pairs", pairs), ("queries", queries)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"MQAR: {name} must be a positive integer, got {value!r}")
    if 1 + 2 * pairs > context:
        raise ConfigError(f"MQAR: {pairs} pairs need a context of at least {1 + 2 * pairs} tokens, got {context}")
    if pairs > vocab.keys:
        raise ConfigError(f"MQAR: {pairs} pairs need {pairs} distinct keys, the vocabulary has {vocab.keys}")
    if queries > pairs:
        raise ConfigError(f"MQAR: {queries} queries exceed the {pairs} pairs (each query asks a distinct key)")
    if not stretch >= 1:
        raise ConfigError(f"MQAR: stretch must be >= 1, got {stretch!r}")


def make_batch(batch: int, context: int, pairs: int, queries: int, vocab: MQARVocab = MQARVocab(), *,
               generator: Optional[torch.Generator] = None, stretch: float = 1.0) -> MQARBatch:
    """A batch of MQAR examples (see the module doc); ``stretch``: position-id spread, >= 1."""
    _check(batch, context, pairs, queries, vocab, stretch)
    g = generator
    B, C, P, Q = batch, context, pairs, queries
    filler = C - 1 - 2 * P
    units = P + filler  # a pair is one unit of two tokens, a filler token one unit of one
    keys = torch.rand(B, vocab.keys, generator=g).argsort(-1)[:, :P] + vocab.first_key  # (B, P) distinct
    values = torch.randint(vocab.values, (B, P), generator=g) + vocab.first_value  # (B, P)
    is_pair = torch.zeros(B, units, dtype=torch.bool)
    pair_units = torch.rand(B, units, generator=g).argsort(-1)[:, :P].sort(-1).values  # (B, P) ascending
    is_pair.scatter_(1, pair_units, True)
    length = 1 + is_pair.long()  # (B, U)
    start = 1 + length.cumsum(-1) - length  # (B, U): first token of each unit (after BOS)
    ids = torch.randint(vocab.filler, (B, C + 2 * Q), generator=g) + 1  # filler everywhere, then overwrite
    ids[:, 0] = vocab.bos
    pair_start = start.gather(1, pair_units)  # (B, P): where pair j (in context order) begins
    ids.scatter_(1, pair_start, keys)
    ids.scatter_(1, pair_start + 1, values)
    asked = torch.rand(B, P, generator=g).argsort(-1)[:, :Q]  # (B, Q) which pairs are queried, in query order
    q_pos = C + 2 * torch.arange(Q).expand(B, Q)  # (B, Q)
    ids.scatter_(1, q_pos, keys.gather(1, asked))
    ids.scatter_(1, q_pos + 1, values.gather(1, asked))
    labels = torch.full_like(ids, IGNORE)
    labels.scatter_(1, q_pos, values.gather(1, asked))
    positions = torch.arange(C + 2 * Q).expand(B, -1).clone()
    if stretch > 1:
        extra = (torch.rand(B, 1, generator=g) * (stretch - 1) * C).long()  # (B, 1) extra positions per example
        weights = torch.rand(B, units, generator=g)
        gaps = (weights / weights.sum(-1, keepdim=True) * extra).long()  # (B, U) added before each unit
        shift = torch.zeros(B, C + 2 * Q, dtype=torch.long)
        shift.scatter_(1, start, gaps.cumsum(-1))  # a unit's tokens take the shift of its first token
        shift[:, C:] = gaps.sum(-1, keepdim=True)
        shift[:, :C] = shift[:, :C].cummax(-1).values
        positions = positions + shift
    return MQARBatch(ids=ids, labels=labels, positions=positions, context=C, queries=Q)
