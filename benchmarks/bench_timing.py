"""Wall-clock timing shared by the benchmark scripts and the peer runner (no torch import here):
``time_fn`` for a call, ``TokenClock`` for the decode rate of a streamed generation."""

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


class TokenClock:
    """A ``generate`` streamer that notes when each generated token arrives: the decode rate is then
    measured from the first generated token to the last, without the prompt's prefill or the engine's
    set-up (as ``llama-bench``'s generation test, which runs no prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_tps(self) -> float:
        if len(self.times) < 2:
            raise ValueError(f"need at least 2 generated tokens to time decoding, got {len(self.times)}")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])
