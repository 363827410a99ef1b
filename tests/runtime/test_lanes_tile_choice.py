"""Measured lanes-kernel tiles (sparseforge.measure.lanes_tile): timed on this machine once per CPU
and question, cached, the rule kept when the machine is too noisy; SparseLinear uses them per batch
bucket; ``sparseforge advise`` shows them."""

from __future__ import annotations

import pytest
import torch

import sparseforge.measure.choose as choose_mod
import sparseforge.measure.lanes_tile as lt
import sparseforge.measure.tuning_cache as tc
from sparseforge import ops
from sparseforge.errors import ConfigError
from sparseforge.formats import BitmapWeight
from sparseforge.measure.lanes_tile import RULE, LanesTile, batch_bucket, measured_tile, tile_question
from sparseforge.measure.timing import Measurement, Timing
from sparseforge.measure.tuning_cache import TuningCache
from sparseforge.nn import SparseLinear
from sparseforge.runtime.advise import advise_model


def _weight(out=512, inp=512, density=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    return BitmapWeight.from_dense(torch.randn(out, inp, generator=g) * (torch.rand(out, inp, generator=g) < density))


def _fake_measurement(ms: dict[str, tuple[float, float, float]], stable: bool) -> Measurement:
    """(median, ci_low, ci_high) ms per candidate."""
    timings = {k: Timing(m, lo, hi, lo, lo, hi, 20) for k, (m, lo, hi) in ms.items()}
    return Measurement(timings, 20, stable, 0.1, {k: (m / 1e3,) * 20 for k, (m, _, _) in ms.items()})


def test_labels_round_trip_and_bad_tiles_are_refused():
    for tile in lt.candidates() + [LanesTile(256, 32)]:
        assert LanesTile.from_label(tile.label) == tile
    assert RULE.label == "rule" and LanesTile(256, 32).kwargs() == {"col_tile": 256, "block_rows": 32}
    for bad in ((100, 0), (0, 300), (-64, 0), (True, 0)):
        with pytest.raises(ConfigError, match="col_tile|block_rows"):
            LanesTile(*bad)
    with pytest.raises(ConfigError, match="not a lanes tile label"):
        LanesTile.from_label("cols-fast")


def test_batch_buckets_follow_the_lanes_layout():
    assert [batch_bucket(b) for b in (4, 16, 17, 48, 64, 65, 1000)] == [16, 16, 32, 48, 64, 64, 64]


def test_measured_once_per_question_then_cached(tmp_path, monkeypatch):
    cache = TuningCache(tmp_path / "t.json")
    timed = []

    def settled(fns, **kw):  # every candidate timed; rows32 clearly fastest
        timed.append(sorted(fns))
        return _fake_measurement({k: (1.0, 0.99, 1.01) if k == "rows32" else (2.0, 1.98, 2.02) for k in fns}, True)

    monkeypatch.setattr(choose_mod, "time_interleaved", settled)
    w = _weight()
    tile, choice = measured_tile(w, 64, cache=cache)
    assert tile == LanesTile(0, 32) and not choice.cached and timed == [sorted(t.label for t in lt.candidates())]
    again, cached = measured_tile(w, 50, cache=cache)  # same bucket (64): from the cache
    assert cached.cached and again == tile and len(timed) == 1
    measured_tile(w, 8, cache=cache)  # another bucket: measured
    measured_tile(_weight(512, 640), 64, cache=cache)  # another shape: measured
    measured_tile(_weight(density=0.5), 64, cache=cache)  # another density: measured
    assert len(timed) == 4 and len(cache.entries()) == 4
    entry = cache.entries()[0]
    assert entry["kind"] == "lanes_tile" and entry["question"]["family"] == "bitmap" and entry["machine"]["cpu"]


def test_real_timing_returns_a_candidate(tmp_path):
    tile, choice = measured_tile(_weight(), 16, budget_s=0.005, cache=TuningCache(tmp_path / "t.json"))
    assert tile in lt.candidates() and set(choice.ms) == {t.label for t in lt.candidates()}
    assert choice.ms[choice.name] > 0


def test_another_cpu_measures_again(tmp_path, monkeypatch):
    cache = TuningCache(tmp_path / "t.json")
    monkeypatch.setattr(choose_mod, "time_interleaved",
                        lambda fns, **kw: _fake_measurement({k: (1.0 if k == "cols256" else 2.0, 0.99 if k == "cols256" else 1.98,
                                                                 1.01 if k == "cols256" else 2.02) for k in fns}, True))
    w = _weight()
    assert measured_tile(w, 64, cache=cache)[0] == LanesTile(256, 0)
    assert measured_tile(w, 64, cache=cache)[1].cached
    real = tc.cpu_fingerprint
    monkeypatch.setattr(tc, "cpu_fingerprint", lambda threads: {**real(threads), "cpu": "Some Other CPU"})
    assert not measured_tile(w, 64, cache=cache)[1].cached  # keyed per CPU model
    assert len(cache.entries()) == 2


def test_a_noisy_measurement_keeps_the_rule_uncached(tmp_path, monkeypatch):
    cache = TuningCache(tmp_path / "t.json")
    # cols512 looks 10% faster, but the intervals overlap and the timing did not settle
    monkeypatch.setattr(choose_mod, "time_interleaved",
                        lambda fns, **kw: _fake_measurement({k: (0.9, 0.6, 1.3) if k == "cols512" else (1.0, 0.7, 1.4)
                                                             for k in fns}, False))
    tile, choice = measured_tile(_weight(), 64, cache=cache)
    assert tile == RULE and "too noisy" in choice.reason
    assert cache.entries() == []


def test_a_forward_never_measures_it_takes_the_cached_answer_or_the_rule(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lt, "measured_tile", lambda *a, **kw: pytest.fail("a forward measured a tile"))
    w = _weight()
    TuningCache().put("lanes_tile", tile_question(w, 64), {"name": "cols256-rows32"})
    layer = SparseLinear(w)
    x = torch.randn(64, 512)
    with torch.no_grad(), caplog.at_level("DEBUG", logger="sparseforge.measure.lanes_tile"):
        y = layer(x)  # bucket 64: cached
        layer(torch.randn(40, 512))  # bucket 48: nothing cached, the rule
        layer(torch.randn(2, 512))  # rows kernels: no tile
    assert layer.lanes_tiles == {64: LanesTile(256, 32), 48: RULE}
    assert "cols256-rows32 (cached measurement)" in caplog.text and "rule (not measured on this machine yet" in caplog.text
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.to_dense()), rtol=1e-5, atol=1e-3)


def test_measure_lanes_tiles_measures_per_batch_bucket_ahead_of_use(monkeypatch):
    calls = []
    monkeypatch.setattr(lt, "measured_tile", lambda w, b, **kw: calls.append(batch_bucket(b)) or (LanesTile(128, 16), None))
    layer = SparseLinear(_weight())
    assert layer.measure_lanes_tiles((64, 40, 2)) == {64: LanesTile(128, 16), 48: LanesTile(128, 16)}
    assert calls == [64, 48]
    x = torch.randn(64, 512)
    with torch.no_grad():
        y = layer(x)
        layer(torch.randn(40, 512))
    assert calls == [64, 48]  # the forwards used what was measured
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.to_dense()), rtol=1e-5, atol=1e-3)
    layer.lanes_tile = LanesTile(1024, 0)  # fixed: no measuring
    assert layer.measure_lanes_tiles((64,)) == {} and calls == [64, 48]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-3)
    small = SparseLinear(_weight(64, 64))  # below MIN_WEIGHTS: the rule, never measured
    assert small.measure_lanes_tiles((64,)) == {64: RULE} and calls == [64, 48]
    with pytest.raises(ConfigError, match="buckets in"):
        small.set_lanes_tiles({20: RULE})


def test_measure_tiles_times_each_distinct_question_once(monkeypatch):
    from sparseforge.runtime.tiles import measure_tiles_

    calls = []
    monkeypatch.setattr(lt, "measured_tile", lambda w, b, **kw: calls.append((tuple(w.shape), batch_bucket(b)))
                        or (LanesTile(256, 0), None))
    net = torch.nn.Sequential(*(SparseLinear(_weight(seed=i)) for i in range(3)), SparseLinear(_weight(512, 640)),
                              SparseLinear(_weight(64, 64)))
    tiles = measure_tiles_(net, (64, 16))
    assert sorted(calls) == [((512, 512), 16), ((512, 512), 64), ((512, 640), 16), ((512, 640), 64)]
    assert tiles == {str(i): {16: "cols256", 64: "cols256"} for i in range(4)}  # the 64x64 layer takes no tile
    assert all(net[i].lanes_tiles == {16: LanesTile(256, 0), 64: LanesTile(256, 0)} for i in range(4))


def test_compress_measures_the_tiles_so_the_first_forward_does_not(monkeypatch):
    from sparseforge.runtime.compress import compress_

    calls = []
    monkeypatch.setattr(lt, "measured_tile", lambda w, b, **kw: calls.append(batch_bucket(b)) or (LanesTile(512, 0), None))
    net = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False))
    with torch.no_grad():
        net[0].weight.mul_(torch.rand(512, 512) > 0.5)
    report = compress_(net, format="bitmap", tile_batches=(64,))
    assert calls == [64] and report.tiles == {"0": {64: "cols512"}}
    with torch.no_grad():
        net(torch.randn(64, 512))
    assert calls == [64] and net[0].lanes_tiles == {64: LanesTile(512, 0)}
    assert compress_(torch.nn.Sequential(torch.nn.Linear(512, 512)), format="bitmap", min_sparsity=0.0,
                     tile_batches=()).tiles == {}


def test_sparse_linear_passes_its_tile_to_the_op(monkeypatch):
    seen = []
    real = ops.linear
    monkeypatch.setattr(ops, "linear", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    layer = SparseLinear(_weight())
    layer.lanes_tile = LanesTile(256, 64)
    with torch.no_grad():
        layer(torch.randn(8, 512))
        layer(torch.randn(1, 512))
    assert seen == [{"activations": "float", "col_tile": 256, "block_rows": 64}, {"activations": "float"}]


def test_rule_switch_and_bad_settings(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_LANES_TILE", "rule")
    monkeypatch.setattr(lt, "measured_tile", lambda *a, **kw: pytest.fail("measured although SPARSEFORGE_LANES_TILE=rule"))
    layer = SparseLinear(_weight())
    with torch.no_grad():
        layer(torch.randn(64, 512))
    assert layer.lanes_tiles == {64: RULE}
    monkeypatch.setenv("SPARSEFORGE_LANES_TILE", "fastest")
    with pytest.raises(ConfigError, match="SPARSEFORGE_LANES_TILE"):
        lt.tiling_enabled()
    with pytest.raises(ConfigError, match="lanes_tile must be"):
        layer.lanes_tile = (256, 0)
    fanin = SparseLinear.from_linear(torch.nn.Linear(16, 4), "fanin")
    with pytest.raises(ConfigError, match="lanes_tile applies to"):
        fanin.lanes_tile = LanesTile(256, 0)
    fanin.lanes_tile = RULE  # the rule is fine everywhere


def test_question_names_what_the_answer_depends_on():
    q = tile_question(_weight(density=0.25), 33)
    assert q == {"family": "bitmap", "dtype": "float32", "shape": [512, 512], "density": q["density"], "batch": 48}
    assert 0.2 <= q["density"] <= 0.3


def test_advise_reports_the_chosen_formats_tiles(monkeypatch):
    monkeypatch.setattr(lt, "measured_tile", lambda w, b, **kw: (LanesTile(512, 0), None))
    net = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False))
    with torch.no_grad():
        net[0].weight.mul_(torch.rand(512, 512) > 0.9)
    report = advise_model(net, batch_sizes=(1, 64), budget_s=0.002, formats=["bitmap", "csr"], use_cache=False)
    adv = report.layers[0]
    if adv.choice != "dense":
        assert adv.tiles == {64: "cols512"}
        assert "kernel tiles" in report.table() and "batch 64 cols512" in report.table()
    else:
        assert adv.tiles == {}
    assert type(adv).from_dict(adv.to_dict()).tiles == adv.tiles


def test_report_table_lists_the_tiles():
    from sparseforge.runtime.advice import AdviceReport, LayerAdvice

    adv = LayerAdvice((512, 512), 0.9, "float32", {"dense": {1: 1.0, 64: 9.0}, "csr": {1: 0.3, 64: 3.0}}, "csr",
                      layers=["fc1", "fc2"], tiles={64: "cols256-rows32"})
    report = AdviceReport({"cpu": "x", "isa": "avx512", "threads": 2}, (1, 64), [adv])
    assert "  fc1 (+1): csr batch 64 cols256-rows32" in report.table()
    assert LayerAdvice.from_dict(adv.to_dict()).tiles == {64: "cols256-rows32"}
