"""The interleaved timer, the per-machine tuning cache and the measured-choice helper."""

import json
import time

import pytest
from hypothesis import given, strategies as st

from sparseforge.errors import ConfigError
from sparseforge.measure.choose import choose_by_timing
from sparseforge.measure.timing import Measurement, median_ci, time_interleaved
from sparseforge.measure.tuning_cache import TuningCache, cpu_fingerprint


def sleeper(seconds):
    def fn():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pass
    return fn


def test_time_interleaved_orders_candidates_by_cost():
    m = time_interleaved({"short": sleeper(2e-4), "long": sleeper(1e-3)}, budget_s=0.5, min_rounds=15)
    assert m.timings["short"].median_ms < m.timings["long"].median_ms
    assert 0.9 <= m.timings["long"].median_ms <= 10.0  # busy-waits 1 ms (preemption only adds)
    assert m.timings["short"].samples == m.timings["long"].samples == m.rounds >= 15
    assert m.separated("short", "long")


def test_time_interleaved_varies_the_order_each_round():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    time_interleaved(fns, budget_s=0.0, min_rounds=20, max_rounds=20, warmup=0)
    rounds = [tuple(calls[i:i + 4]) for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    predecessors = {r[r.index("a") - 1] for r in rounds if r.index("a") > 0}
    assert len(set(rounds)) > 3 and len(predecessors) >= 2


def test_time_interleaved_stops_at_the_budget_and_says_unstable():
    state = {"n": 0}

    def erratic():  # alternates 0.1 ms and 3 ms: the median never settles within 1%
        state["n"] += 1
        sleeper(3e-3 if state["n"] % 2 else 1e-4)()

    t0 = time.perf_counter()
    m = time_interleaved({"x": erratic}, budget_s=0.1, rel_tol=0.001, min_rounds=5)
    assert time.perf_counter() - t0 < 1.0
    assert not m.stable and m.rounds < 2000


@pytest.mark.parametrize("bad", [dict(budget_s=-1), dict(budget_s=float("nan")), dict(budget_s=0.1, rel_tol=0),
                                 dict(budget_s=0.1, min_rounds=0)])
def test_time_interleaved_rejects_bad_settings(bad):
    with pytest.raises(ConfigError):
        time_interleaved({"a": lambda: None}, **bad)
    with pytest.raises(ConfigError, match="at least one"):
        time_interleaved({}, budget_s=0.1)


@given(st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=400))
def test_median_ci_brackets_the_median(xs):
    s = sorted(xs)
    lo, hi = median_ci(s)
    med = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    assert lo <= med <= hi


def test_tuning_cache_round_trip_and_keys(tmp_path):
    cache = TuningCache(tmp_path / "t.json")
    cache.put("k", {"shape": [2, 3]}, {"name": "a"}, threads=2)
    assert cache.get("k", {"shape": [2, 3]}, threads=2) == {"name": "a"}
    assert cache.get("k", {"shape": [2, 3]}, threads=1) is None  # another thread count is another answer
    assert cache.get("k", {"shape": [3, 2]}, threads=2) is None
    assert cache.get("other", {"shape": [2, 3]}, threads=2) is None
    entry = cache.entries()[0]
    assert entry["machine"] == cpu_fingerprint(2) and entry["question"] == {"shape": [2, 3]}
    assert cache.clear() == 1 and not (tmp_path / "t.json").exists()


def test_tuning_cache_ignores_a_corrupt_file_and_rewrites_it(tmp_path, caplog):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    cache = TuningCache(path)
    assert cache.get("k", {"a": 1}) is None
    assert "unreadable" in caplog.text
    cache.put("k", {"a": 1}, 5)
    assert json.loads(path.read_text())["version"] == 1 and cache.get("k", {"a": 1}) == 5
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_tuning_cache_off_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_TUNING_CACHE", "off")
    cache = TuningCache(tmp_path / "t.json")
    cache.put("k", {"a": 1}, 5)
    assert cache.get("k", {"a": 1}) is None and not (tmp_path / "t.json").exists()


def test_default_cache_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    assert TuningCache().path == tmp_path / "tuning.json"


def test_choose_by_timing_measures_then_reuses(tmp_path):
    cache = TuningCache(tmp_path / "t.json")
    calls = {"fast": 0, "slow": 0}

    def count(name, seconds):
        def fn():
            calls[name] += 1
            sleeper(seconds)()
        return fn

    c = choose_by_timing("demo", {"n": 1}, {"fast": count("fast", 1e-4), "slow": count("slow", 2e-3)},
                         default="slow", budget_s=0.05, cache=cache)
    assert c.name == "fast" and not c.cached and c.ms["fast"] < c.ms["slow"]
    before = dict(calls)
    again = choose_by_timing("demo", {"n": 1}, {"fast": count("fast", 1e-4), "slow": count("slow", 2e-3)},
                             default="slow", budget_s=0.05, cache=cache)
    assert again.name == "fast" and again.cached and calls == before  # nothing timed the second time


def test_choose_by_timing_keeps_the_default_without_a_clear_winner(tmp_path):
    cache = TuningCache(tmp_path / "t.json")
    same = sleeper(5e-4)
    c = choose_by_timing("demo", {"n": 2}, {"a": same, "b": sleeper(5e-4)}, default="b", budget_s=0.05,
                         min_gain=1.5, cache=cache)
    assert c.name == "b"
    with pytest.raises(ConfigError, match="default"):
        choose_by_timing("demo", {"n": 3}, {"a": same}, default="zzz", budget_s=0.01, cache=cache)


def test_paired_ratio_cancels_drift_between_rounds():
    state = {"load": 1.0}

    def drifting(base):
        def fn():
            sleeper(base * state["load"])()
        return fn

    def slow_then_fast():  # load changes round to round; b is always 2x a within a round
        state["load"] = 3.0 if state["load"] == 1.0 else 1.0

    fns = {"a": drifting(2e-4), "b": drifting(4e-4)}
    m = time_interleaved({**fns, "load": slow_then_fast}, budget_s=0.0, min_rounds=21, max_rounds=21, warmup=0)
    med, lo, hi = m.ratio("b", "a")
    assert lo <= med <= hi and 1.4 < med < 3.0  # ~2 whatever the load of the round (unless preempted)
    assert m.ratio("a", "a")[0] == 1.0
    with pytest.raises(ConfigError):
        Measurement({}, 0, True, 0.0, {"a": (), "b": ()}).ratio("a", "b")
