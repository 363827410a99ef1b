"""Timing that survives a busy machine: candidates interleaved, repeated until the medians are stable.

Every speed decision sparseforge takes on the machine it runs on (``format="auto"``, the MoE decode
backend) and the benchmarks that compare variants use :func:`time_interleaved`:

* the candidates are called once each per round, in a fresh random order every round (seeded), so
  a burst of load from another process hits all of them alike and no candidate always runs after
  the same neighbour (whose cache footprint it would inherit);
* rounds repeat until every candidate's median is known to ``rel_tol`` (the half-width of the
  distribution-free 95% confidence interval of the median, from order statistics, relative to the
  median) or the time budget runs out;
* the median ignores outliers by construction (a preempted call is one high sample among many);
  :attr:`Timing.spread` (interquartile range / median) says how noisy the samples were;
* :attr:`Measurement.stable` is ``False`` when the budget ran out first: callers then say plainly that
  the machine was too noisy to decide, instead of acting on the numbers.

Example:
    >>> import torch
    >>> from sparseforge.measure.timing import time_interleaved
    >>> a, b = torch.randn(64, 64), torch.randn(64, 64)
    >>> m = time_interleaved({"mm": lambda: a @ b, "add": lambda: a + b}, budget_s=0.05)
    >>> sorted(m.timings), m.rounds >= 5
    (['add', 'mm'], True)
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from sparseforge.errors import ConfigError

__all__ = ["Timing", "Measurement", "time_interleaved", "median_ci"]


@dataclass(frozen=True)
class Timing:
    """One candidate's samples summarised in milliseconds per call."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    ci_low_ms: float  # 95% confidence interval of the median (order statistics)
    ci_high_ms: float
    samples: int

    @property
    def spread(self) -> float:
        """Interquartile range / median: 0.02 on a quiet machine, 0.3+ when another job competes."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def rel_ci(self) -> float:
        """Half-width of the median's 95% confidence interval, relative to the median."""
        return (self.ci_high_ms - self.ci_low_ms) / 2 / self.median_ms if self.median_ms > 0 else 0.0


@dataclass(frozen=True)
class Measurement:
    """What :func:`time_interleaved` measured: per-candidate :class:`Timing`, rounds, and whether the
    medians converged (``stable``) before the budget ran out."""

    timings: dict[str, Timing]
    rounds: int
    stable: bool
    seconds: float
    samples: dict[str, tuple[float, ...]] = field(default_factory=dict, repr=False)  # seconds per call, by round

    def ratio(self, num: str, den: str) -> tuple[float, float, float]:
        """Median and ~95% confidence interval of the per-round ratio ``num`` time / ``den`` time.

        Both were called in the same round, so load that drifts between rounds cancels out of
        each ratio: the paired ratio is much tighter than the ratio of the two medians."""
        r = sorted(a / b for a, b in zip(self.samples[num], self.samples[den]) if b > 0)
        if not r:
            raise ConfigError(f"no paired samples of {num!r} and {den!r} to compare")
        lo, hi = median_ci(r)
        return statistics.median(r), lo, hi

    def ms(self) -> dict[str, float]:
        """``{name: median ms per call}``."""
        return {k: t.median_ms for k, t in self.timings.items()}

    def separated(self, a: str, b: str) -> bool:
        """True when the medians' confidence intervals of ``a`` and ``b`` do not overlap."""
        ta, tb = self.timings[a], self.timings[b]
        return ta.ci_high_ms < tb.ci_low_ms or tb.ci_high_ms < ta.ci_low_ms


def median_ci(sorted_samples: list[float]) -> tuple[float, float]:
    """Distribution-free ~95% confidence interval of the median of ``sorted_samples`` (ascending):
    the order statistics ``n/2 -/+ 0.98 sqrt(n)`` (normal approximation to the binomial)."""
    n = len(sorted_samples)
    half = 0.98 * math.sqrt(n)
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)))
    return sorted_samples[lo], sorted_samples[hi]


def _summary(samples: list[float]) -> Timing:
    s = sorted(samples)
    q1, _, q3 = statistics.quantiles(s, n=4) if len(s) >= 2 else (s[0], s[0], s[0])
    lo, hi = median_ci(s)
    return Timing(statistics.median(s) * 1e3, q1 * 1e3, q3 * 1e3, s[0] * 1e3, lo * 1e3, hi * 1e3, len(s))


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, budget_s: float, rel_tol: float = 0.02,
                     min_rounds: int = 5, max_rounds: int = 2000, warmup: int = 2, seed: int = 0) -> Measurement:
    """Median milliseconds per call of each function, called round-robin.

    Args:
        fns: ``{name: zero-argument callable}``; each round calls every one once, in a random order.
        budget_s: seconds of calls per candidate after which timing stops even if unstable
            (total wall time is about ``budget_s * len(fns)``).
        rel_tol: stop once every median's 95% confidence half-width is within this fraction of it
            (after ``min_rounds``).
        min_rounds / max_rounds: bounds on the number of rounds.
        warmup: untimed calls of each function first (thread pools, allocator, caches).
        seed: seeds the per-round order.
    Returns:
        :class:`Measurement`; ``stable`` is False when the budget ran out before ``rel_tol`` was met.
    """
    if not fns:
        raise ConfigError("time_interleaved needs at least one function to time")
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not math.isfinite(budget_s) or budget_s < 0:
        raise ConfigError(f"budget_s (seconds of calls per candidate) must be a finite number >= 0, got {budget_s!r}")
    if not 0 < rel_tol < 1:
        raise ConfigError(f"rel_tol must be in (0, 1), got {rel_tol}")
    if not 1 <= min_rounds <= max_rounds:
        raise ConfigError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {k: [] for k in names}
    start = time.perf_counter()
    limit = budget_s * len(names)
    order = random.Random(seed)
    rounds = 0
    while rounds < max_rounds:
        for name in order.sample(names, len(names)):
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
        if rounds < min_rounds:
            continue
        if time.perf_counter() - start >= limit:
            break
        if rounds % 5 == 0 and all(_summary(v).rel_ci <= rel_tol for v in samples.values()):
            break
    timings = {k: _summary(v) for k, v in samples.items()}
    stable = all(t.rel_ci <= rel_tol for t in timings.values())
    return Measurement(timings, rounds, stable, time.perf_counter() - start, {k: tuple(v) for k, v in samples.items()})
