"""The measured advisor: candidates, the choice rule, compress_(format="auto") following it, sweep + plot."""

from __future__ import annotations

import importlib
import statistics

import pytest
import torch

import sparseforge as sf
from sparseforge.errors import ConfigError
from sparseforge.nn import SparseLinear
from sparseforge.runtime.advise import AdviceReport, LayerAdvice, advise_model, measure_layer
from sparseforge.runtime.sweep import plot_sweep, sweep
from sparseforge.runtime.compress import compress_
from sparseforge.runtime.machine import machine_info
from tests.tiny_models import tiny_model


def _masked(out, inp, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * (torch.rand(out, inp, generator=g) < density)


def _expected_choice(adv: LayerAdvice, min_speedup: float) -> str:
    """The rule: the best mean speedup among the formats not dropped as implausible, if it reaches
    min_speedup and was not refused as inside the noise (the note says which)."""
    dropped = set(adv.note.split(" dropped")[0].split(", ")) if " dropped" in adv.note else set()
    ratios = {f: statistics.fmean(adv.paired[f].values()) for f in adv.paired if f not in dropped}
    best = max(ratios, key=ratios.get)
    if ratios[best] < min_speedup or "too noisy to decide" in adv.note:
        return "dense"
    return best


def test_candidates_are_the_formats_that_hold_the_mask():
    unstructured = measure_layer(_masked(32, 64, 0.3), batch_sizes=(1, 3), budget_s=0.002)
    assert set(unstructured.timings) == {"dense", "bitmap", "csr"}  # not N:M: no nm candidate
    assert all(set(t) == {1, 3} and all(v > 0 for v in t.values()) for t in unstructured.timings.values())
    w = torch.randn(32, 64)
    w.view(32, 16, 4)[..., 2:] = 0  # obeys 2:4
    nm = measure_layer(w, batch_sizes=(1,), budget_s=0.002)
    assert set(nm.timings) == {"dense", "bitmap", "csr", "nm", "fanin"}  # 2:4 rows all keep in/2: fan-in holds it too
    assert nm.pattern == ("2:4" if nm.choice == "nm" else None)
    assert nm.sparsity == pytest.approx(0.5)
    only = measure_layer(w, batch_sizes=(1,), formats=["csr"], budget_s=0.002)
    assert set(only.timings) == {"dense", "csr"}


def test_block_candidate_needs_the_recorded_block_pattern():
    g = torch.Generator().manual_seed(3)
    tiles = torch.rand(8, 16, generator=g) < 0.3  # (out/4, in/4) kept tiles
    w = torch.randn(32, 64, generator=g) * tiles.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert "bsr" not in measure_layer(w, budget_s=0.001).timings
    adv = measure_layer(w, pattern="block4x4", budget_s=0.001)
    assert "bsr" in adv.timings and adv.pattern == ("block4x4" if adv.choice == "bsr" else None)


@pytest.mark.parametrize("min_speedup", [0.0, 1.05, float("inf")])
def test_choice_follows_the_measured_times(min_speedup):
    adv = measure_layer(_masked(48, 96, 0.2), batch_sizes=(1, 4), budget_s=0.002, min_speedup=min_speedup)
    assert adv.choice == _expected_choice(adv, min_speedup)
    if min_speedup == float("inf"):
        assert adv.choice == "dense"
    if min_speedup == 0.0 and "too noisy" not in adv.note:
        assert adv.choice != "dense"
    assert "batch 1: dense" in adv.reason() and "batch 4" in adv.reason()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="batch sizes"):
        measure_layer(torch.ones(4, 4), batch_sizes=(0,))
    with pytest.raises(ConfigError, match="unknown format"):
        measure_layer(torch.ones(4, 4), formats=["coo"])
    with pytest.raises(ConfigError, match=r"\(out, in\)"):
        measure_layer(torch.ones(4))
    with pytest.raises(ConfigError, match="in \\(0, 1\\)"):
        sweep([(8, 8)], sparsities=[1.0])
    with pytest.raises(ConfigError, match="not linear layers"):
        advise_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), names=["nope"])


def test_advise_model_groups_layers_by_shape_sparsity_and_pattern():
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(64, 32), torch.nn.Linear(32, 64))
    with torch.no_grad():
        net[0].weight.copy_(_masked(32, 64, 0.5, 1))
        net[1].weight.copy_(_masked(32, 64, 0.5, 2))
        net[1].weight.view(32, 16, 4)[..., 2:] = 0  # the same shape, but 2:4 and sparser
        net[2].weight.copy_(_masked(64, 32, 0.5, 3))
    report = advise_model(net, budget_s=0.002)
    assert sorted(sorted(a.layers) for a in report.layers) == [["0"], ["1"], ["2"]]
    assert "nm" in report.choice_for("1").timings and "nm" not in report.choice_for("0").timings
    twins = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    with torch.no_grad():
        for lin in twins:
            lin.weight.copy_(_masked(16, 16, 0.25, 4))
    assert [a.layers for a in advise_model(twins, budget_s=0.002).layers] == [["0", "1"]]


def _advice_for(model, choices: dict[str, str]) -> AdviceReport:
    """A hand-built report: layer -> format, with made-up timings (compress_ must follow the choice)."""
    report = AdviceReport(machine_info(1), (1,))
    for name, choice in choices.items():
        w = model.get_submodule(name).weight
        report.layers.append(LayerAdvice(tuple(w.shape), 0.5, "float32", {"dense": {1: 1.0}, "bitmap": {1: 2.0}},
                                         choice, pattern="2:4" if choice == "nm" else None, layers=[name]))
    return report


def test_compress_auto_follows_the_advice_and_keeps_losers_dense():
    model = tiny_model("llama")
    sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", pattern="2:4"), progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    choices = {n: ("dense", "nm", "csr", "bitmap")[i % 4] for i, n in enumerate(names)}
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    report = compress_(model, advice=_advice_for(model, choices))
    got = {c.name: c.format.split()[0] for c in report.converted}
    assert got == {n: c for n, c in choices.items() if c != "dense"}
    dense_reasons = dict(report.kept_dense)
    assert all(dense_reasons[n].startswith("dense is faster on this machine") for n, c in choices.items() if c == "dense")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)
    fresh = tiny_model("llama")
    sf.sparsify_(fresh, sf.SparsifyConfig(method="magnitude", pattern="2:4"), progress=False)
    with pytest.raises(ConfigError, match="does not cover layer"):
        compress_(fresh, advice=_advice_for(fresh, {names[0]: "nm"}))


def test_compress_auto_measures_when_no_advice_is_given():
    model = tiny_model("llama")
    sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", sparsity=0.9), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    report = compress_(model, batch_sizes=(1, 2))
    assert len(report.converted) + len(report.kept_dense) == 15  # 14 pruned layers + lm_head, each accounted for
    measured = [why for n, why in report.kept_dense if n != "lm_head"]
    assert all(w.startswith("dense is faster on this machine (measured") for w in measured)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == len(report.converted)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)


def test_sweep_table_and_plot(tmp_path):
    importlib.import_module("matplotlib")
    report = sweep([(16, 32), (32, 16)], batch_sizes=(1, 2), sparsities=(0.5, 0.9), budget_s=0.001, stream=False)
    assert len(report.sweep) == 2 * 3 * 2  # shapes x (2 sparsities + 2:4) x batch sizes
    row = next(r for r in report.sweep if r["label"] == "90%" and r["batch"] == 2)
    assert row["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert row["speedup"]["csr"] == pytest.approx(row["dense_ms"] / row["ms"]["csr"])
    assert "nm" in next(r for r in report.sweep if r["label"] == "2:4")["speedup"]
    table = report.table()
    assert "| 16x32 | 2 | 90% |" in table
    png = plot_sweep(report, tmp_path / "out" / "speedup.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob("*.tmp.png"))


def test_weights_stream_compares_the_model_with_this_machines_cache(monkeypatch):
    from sparseforge.runtime import advise
    from sparseforge.runtime.machine import CacheSize

    model = tiny_model("llama")
    weight_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(advise, "last_level_cache", lambda: CacheSize(weight_bytes, "test"))
    assert not advise.weights_stream(model)  # fits exactly: runs from cache
    monkeypatch.setattr(advise, "last_level_cache", lambda: CacheSize(weight_bytes - 1, "test"))
    assert advise.weights_stream(model)


def test_streamed_small_weight_cycles_through_independent_copies(monkeypatch):
    from sparseforge.runtime import advise

    monkeypatch.setattr(advise, "stream_bytes", lambda candidates: 64 * 32 * 4 * 5)  # five dense copies
    import copy
    import types

    built = []
    monkeypatch.setattr(advise, "copy", types.SimpleNamespace(deepcopy=lambda x: built.append(x) or copy.deepcopy(x)))
    w = torch.randn(64, 32) * (torch.rand(64, 32) > 0.9)
    adv = measure_layer(w, batch_sizes=(1,), budget_s=0.001, stream=True, formats=["bitmap", "csr"])
    assert sorted(adv.timings) == ["bitmap", "csr", "dense"]
    assert len(built) == 2 * 4  # every sparse candidate: itself plus four copies
    assert all(isinstance(b, SparseLinear) for b in built)
