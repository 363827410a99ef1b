"""Wall-clock timing shared by the benchmark scripts and the peer runner (no torch import here)."""

from __future__ import annotations

import math
import statistics
import time


def time_fn(fn, budget: float) -> dict:
    """Median wall time of fn() after 2 warm-up calls; passes = clamp(budget / first, 5, 40).

    Example::

        t = time_fn(lambda: model(x), budget=3.0)   # {"ms": ..., "min_ms", "q1_ms", "q3_ms", "passes"}
    """
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    n = max(5, min(40, math.ceil(budget / max(first, 1e-6))))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    q = statistics.quantiles(ts, n=4)
    return {"ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2], "passes": n}
