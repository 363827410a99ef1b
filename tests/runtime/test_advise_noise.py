"""The advisor on a busy machine: implausible ratios, unsettled timings, the per-machine cache, streaming size."""

import torch

from sparseforge.runtime import advise, machine
from sparseforge.runtime.timing import Measurement, Timing


def pruned(out=32, inp=64, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * (torch.rand(out, inp, generator=g) < density)


def fake_timer(ms: dict, stable: bool = True, ci: float = 0.01):
    """A time_interleaved stand-in that reports ``ms`` (per candidate name) with a +-ci confidence interval."""
    calls = []

    def timer(fns, **kw):
        calls.append(sorted(fns))
        for fn in fns.values():
            fn()  # the candidates still run (they must be callable)
        timings = {k: Timing(ms[k], ms[k], ms[k], ms[k], ms[k] * (1 - ci), ms[k] * (1 + ci), 5) for k in fns}
        return Measurement(timings, 5, stable, 0.0)

    timer.calls = calls
    return timer


def test_a_ratio_beyond_the_bytes_bound_is_remeasured_then_dropped(monkeypatch):
    timer = fake_timer({"dense": 10.0, "bitmap": 8.0, "csr": 0.01})  # csr "1000x faster": a preempted dense call
    monkeypatch.setattr(advise, "time_interleaved", timer)
    adv = advise.measure_layer(pruned(), budget_s=0.0)
    assert len(timer.calls) == 2  # measured, found implausible, measured again
    assert adv.choice == "bitmap" and "csr dropped" in adv.note and "too busy" in adv.note


def test_a_win_inside_the_noise_of_an_unsettled_machine_keeps_dense(monkeypatch):
    monkeypatch.setattr(advise, "time_interleaved", fake_timer({"dense": 1.0, "bitmap": 0.9, "csr": 0.85},
                                                               stable=False, ci=0.3))
    adv = advise.measure_layer(pruned(), budget_s=0.0)
    assert adv.choice == "dense" and "too noisy to decide" in adv.note


def test_a_clear_win_on_an_unsettled_machine_is_taken(monkeypatch):
    monkeypatch.setattr(advise, "time_interleaved", fake_timer({"dense": 1.0, "bitmap": 0.9, "csr": 0.5},
                                                               stable=False, ci=0.05))
    adv = advise.measure_layer(pruned(), budget_s=0.0)
    assert adv.choice == "csr" and adv.note == ""


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
