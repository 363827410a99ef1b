"""Choosing the next token from one step's logits: greedy, or sampling with temperature / top-k / top-p.

The same rules, in the same order, as transformers' ``generate`` with ``do_sample=True``
(``TemperatureLogitsWarper``, then ``TopKLogitsWarper``, then ``TopPLogitsWarper``, then
``torch.multinomial`` over the softmax): divide by the temperature; keep the ``top_k`` largest
logits (ties with the k-th kept); keep the smallest set of most likely tokens whose probability
adds up to more than ``top_p`` (at least one token); draw one token. :class:`TokenPicker` draws
from its own ``torch.Generator`` seeded with ``seed``, so a seed gives the same tokens on every run
and leaves torch's global random state alone.

Example:
    >>> import torch
    >>> picker = TokenPicker(Sampling(temperature=0.0))
    >>> picker(torch.tensor([0.1, 2.0, -1.0]))
    1
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from sparseforge.errors import ConfigError

__all__ = ["Sampling", "TokenPicker", "filter_logits"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature == 0`` is greedy (argmax; the other fields are unused).

    ``top_k``: keep the k most likely tokens (0 or ``None``: all); ``top_p``: nucleus mass in (0, 1]
    (1 or ``None``: all); ``seed``: the picker's random generator seed.
    """

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise ConfigError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1] (1 = no limit), got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: Tensor, sampling: Sampling) -> Tensor:
    """``logits (vocab,)`` divided by the temperature, with the tokens top-k / top-p drop set to ``-inf``."""
    scores = logits / sampling.temperature  # (vocab,)
    if sampling.top_k:
        k = min(sampling.top_k, scores.numel())
        kth = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if sampling.top_p is not None and sampling.top_p < 1:
        ascending, order = torch.sort(scores)
        cumulative = ascending.softmax(-1).cumsum(-1)  # (vocab,) mass of this token and every less likely one
        drop = cumulative <= 1 - sampling.top_p
        drop[-1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(0, order, drop), -math.inf)
    return scores


class TokenPicker:
    """Picks token ids from logits by a :class:`Sampling` rule; holds the seeded random generator.

    Example:
        >>> import torch
        >>> pick = TokenPicker(Sampling(temperature=1.0, top_k=1, seed=3))
        >>> pick(torch.tensor([0.5, 0.1, 3.0]))   # top_k=1 leaves only the argmax
        2
    """

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(sampling.seed)

    def __call__(self, logits: Tensor) -> int:
        """The next token id from float ``logits (vocab,)``."""
        if self.sampling.greedy:
            return int(logits.argmax())
        probs = filter_logits(logits, self.sampling).softmax(-1)  # (vocab,)
        return int(torch.multinomial(probs, 1, generator=self.generator))
