"""Pick the fastest of a few interchangeable implementations by timing them here, once per machine.

:func:`choose_by_timing` is the one place where an ``"auto"`` option turns into a measured choice:
it times the candidates interleaved (:func:`sparseforge.measure.timing.time_interleaved`), keeps the
fastest only when it is faster than the default by more than the measurement's own uncertainty,
falls back to the default with a reason when the machine was too noisy to tell, and stores the
answer in the per-machine :class:`~sparseforge.measure.tuning_cache.TuningCache` so the next process
on the same CPU reuses it. The choice is logged at debug level (logger ``sparseforge.measure.choose``).

Example:
    >>> import torch, tempfile, os
    >>> from sparseforge.measure.choose import choose_by_timing
    >>> from sparseforge.measure.tuning_cache import TuningCache
    >>> a, b = torch.randn(256, 256), torch.randn(256, 256)
    >>> cache = TuningCache(os.path.join(tempfile.mkdtemp(), "t.json"))
    >>> c = choose_by_timing("demo", {"n": 256}, {"mm": lambda: a @ b, "slow": lambda: [a @ b for _ in range(4)]},
    ...                      default="slow", budget_s=0.05, cache=cache)
    >>> c.name, c.cached
    ('mm', False)
    >>> choose_by_timing("demo", {"n": 256}, {}, default="slow", cache=cache).cached
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from sparseforge.errors import ConfigError
from sparseforge.measure.timing import time_interleaved
from sparseforge.measure.tuning_cache import TuningCache

__all__ = ["Choice", "choose_by_timing"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """The chosen candidate, the median ms per call of each (empty when read from the cache), whether
    it came from the cache, and why."""

    name: str
    ms: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    reason: str = ""


def choose_by_timing(kind: str, question: Mapping[str, Any], candidates: Mapping[str, Callable[[], Any]], *,
                     default: str, budget_s: float = 0.3, min_gain: float = 1.03, threads: Optional[int] = None,
                     cache: Optional[TuningCache] = None) -> Choice:
    """The fastest of ``candidates`` on this machine for ``question`` (a JSON-able description of the
    shapes and settings the answer depends on), measured once and cached.

    A candidate other than ``default`` wins only if ``default``'s median is at least ``min_gain``
    times its median *and* their confidence intervals do not overlap; when the timing did not
    converge within ``budget_s`` per candidate and the winner is not clear, ``default`` is kept and
    the reason says the machine was too noisy. Noisy answers are not cached.
    """
    cache = cache if cache is not None else TuningCache()
    stored = cache.get(kind, dict(question), threads)
    if stored is not None:
        choice = Choice(stored["name"], dict(stored.get("ms", {})), True, stored.get("reason", "") + " (cached)")
        log.debug("%s %s -> %s (cached)", kind, dict(question), choice.name)
        return choice
    if default not in candidates:
        raise ConfigError(f"choose_by_timing: default {default!r} is not one of the candidates {sorted(candidates)}")
    meas = time_interleaved(candidates, budget_s=budget_s)
    ms = meas.ms()
    best = min(ms, key=ms.get)
    clear = best == default or (ms[default] >= min_gain * ms[best] and meas.separated(best, default))
    timings = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(ms.items(), key=lambda kv: kv[1]))
    if best != default and not clear:
        name = default
        reason = (f"kept {default}: {best} not clearly faster ({timings}"
                  + ("" if meas.stable else "; the machine was too noisy to decide") + ")")
    else:
        name, reason = best, f"measured on this machine: {timings}"
    choice = Choice(name, ms, False, reason)
    if meas.stable or clear:
        cache.put(kind, dict(question), {"name": name, "ms": ms, "reason": reason}, threads)
    log.debug("%s %s -> %s (%s)", kind, dict(question), name, reason)
    return choice
