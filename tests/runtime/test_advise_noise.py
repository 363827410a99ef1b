"""The advisor on a busy machine: implausible ratios, unsettled timings, the per-machine cache, streaming size."""

import torch

from sparseforge.runtime import advise, machine
import statistics

from sparseforge.measure.timing import Measurement, Timing, median_ci


def pruned(out=32, inp=64, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * (torch.rand(out, inp, generator=g) < density)


def fake_timer(samples: dict, stable: bool = True):
    """A time_interleaved stand-in reporting ``samples[name]`` (ms per round) for each candidate."""
    calls = []

    def timer(fns, **kw):
        calls.append(kw["budget_s"])
        for fn in fns.values():
            fn()  # the candidates still run (they must be callable)
        rows = {k: [v] * 9 if isinstance(v, float) else list(v) for k, v in samples.items() if k in fns}
        timings = {}
        for k, v in rows.items():
            s = sorted(v)
            lo, hi = median_ci(s)
            timings[k] = Timing(statistics.median(s), s[len(s) // 4], s[3 * len(s) // 4], s[0], lo, hi, len(s))
        return Measurement(timings, len(next(iter(rows.values()))), stable, 0.0,
                           {k: tuple(t / 1e3 for t in v) for k, v in rows.items()})

    timer.calls = calls
    return timer


def test_a_ratio_beyond_the_bytes_bound_is_remeasured_then_dropped(monkeypatch):
    timer = fake_timer({"dense": 10.0, "bitmap": 8.0, "csr": 0.01})  # csr "1000x faster": a preempted dense call
    monkeypatch.setattr(advise, "time_interleaved", timer)
    adv = advise.measure_layer(pruned(), budget_s=0.1)
    assert timer.calls == [0.1, 0.2, 0.4]  # measured, found implausible, measured again with more budget
    assert adv.choice == "bitmap" and "csr dropped" in adv.note and "too busy" in adv.note


def test_a_win_inside_the_noise_of_an_unsettled_machine_keeps_dense(monkeypatch):
    # csr is 1.25x faster in the median round, but slower in 4 of 9 rounds: its interval reaches 1
    noisy = fake_timer({"dense": [1.0] * 9, "bitmap": [1.0] * 9, "csr": [0.6, 0.7, 0.8, 0.8, 0.8, 1.3, 1.3, 1.4, 1.5]},
                       stable=False)
    monkeypatch.setattr(advise, "time_interleaved", noisy)
    adv = advise.measure_layer(pruned(), budget_s=0.1)
    assert adv.choice == "dense" and "too noisy to decide" in adv.note
    assert noisy.calls == [0.1, 0.2, 0.4]  # re-measured twice before giving up


def test_a_clear_win_on_an_unsettled_machine_is_taken(monkeypatch):
    # the medians drift (unstable), but csr is faster than dense in every round: paired ratios decide
    dense = [1.0, 3.0, 1.2, 2.5, 1.1, 2.8, 1.0, 3.0, 1.3]
    clear = fake_timer({"dense": dense, "bitmap": [t * 0.95 for t in dense], "csr": [t * 0.5 for t in dense]},
                       stable=False)
    monkeypatch.setattr(advise, "time_interleaved", clear)
    adv = advise.measure_layer(pruned(), budget_s=0.1)
    assert adv.choice == "csr" and adv.note == "" and clear.calls == [0.1]
    assert abs(adv.paired["csr"][1] - 2.0) < 1e-9


def test_advise_model_reuses_the_per_machine_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    net = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 64, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(pruned(32, 64))
        net[1].weight.copy_(pruned(64, 32, seed=1))
    first = advise.advise_model(net, threads=1, budget_s=0.002)
    measured = []
    real = advise.measure_layer
    monkeypatch.setattr(advise, "measure_layer", lambda w, **kw: measured.append(1) or real(w, **kw))
    second = advise.advise_model(net, threads=1, budget_s=0.002)
    cached = [a for a in second.layers if a.cached]
    fresh = [a for a in first.layers if not a.note]
    assert len(cached) == len(fresh) >= 1 and len(measured) == len(second.layers) - len(cached)
    assert all("(cached)" in a.reason() for a in cached)
    by_layers = {tuple(a.layers): a for a in first.layers}
    assert all(a.choice == by_layers[tuple(a.layers)].choice and a.timings == by_layers[tuple(a.layers)].timings
               for a in cached)
    third = advise.advise_model(net, threads=1, budget_s=0.002, use_cache=False)
    assert not any(a.cached for a in third.layers)


def test_stream_bytes_covers_twice_the_last_level_cache(monkeypatch):
    monkeypatch.setattr(advise, "last_level_cache", lambda: machine.CacheSize(300 << 20, "test"))
    monkeypatch.setattr(advise, "available_memory_bytes", lambda: 64 << 30)
    assert advise.stream_bytes(4) == 600 << 20
    monkeypatch.setattr(advise, "available_memory_bytes", lambda: 1 << 30)  # little memory: capped, never below the floor
    assert advise.stream_bytes(4) == max(advise.STREAM_BYTES, (1 << 30) // 16)


def test_a_close_call_between_two_formats_is_remeasured_on_an_unsettled_machine(monkeypatch):
    # both beat dense clearly; bitmap and csr take turns being faster: not told apart
    close = fake_timer({"dense": [2.0] * 9, "bitmap": [1.0, 1.1, 1.0, 1.1, 1.0, 1.1, 1.0, 1.1, 1.0],
                        "csr": [1.1, 1.0, 1.1, 1.0, 1.1, 1.0, 1.1, 1.0, 0.9]}, stable=False)
    monkeypatch.setattr(advise, "time_interleaved", close)
    adv = advise.measure_layer(pruned(), budget_s=0.1)
    assert close.calls == [0.1, 0.2, 0.4]
    assert adv.choice in ("bitmap", "csr") and adv.note == ""


def test_a_clear_leader_or_a_settled_machine_ends_the_measurement(monkeypatch):
    clear = fake_timer({"dense": [2.0] * 9, "bitmap": [1.0] * 9, "csr": [1.2] * 9}, stable=False)
    monkeypatch.setattr(advise, "time_interleaved", clear)
    assert advise.measure_layer(pruned(), budget_s=0.1).choice == "bitmap" and clear.calls == [0.1]
    settled = fake_timer({"dense": [2.0] * 9, "bitmap": [1.0, 1.1] * 4 + [1.0], "csr": [1.1, 1.0] * 4 + [1.1]})
    monkeypatch.setattr(advise, "time_interleaved", settled)
    advise.measure_layer(pruned(), budget_s=0.1)
    assert settled.calls == [0.1]
