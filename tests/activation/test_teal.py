"""TEAL calibration (histogram thresholds, greedy allocation) and sparsify_activations_ on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseforge.activation import (
    ActivationSparsityConfig,
    SparseInputLinear,
    set_token_fraction,
    sparse_input_layers,
    sparsify_activations_,
)
from sparseforge.activation.calibrate import Histogram
from sparseforge.activation.teal import GreedyStep, _closest, _position_norms
from sparseforge.config import CalibrationConfig
from sparseforge.errors import ConfigError, DataError, ModelError, NumericalError
from tiny_models import VOCAB, tiny_model

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _calib(samples=8, seqlen=16, seed=0):
    return torch.randint(0, VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def _cfg(**kw):
    kw.setdefault("calibration", CalibrationConfig(batch_size=4))
    return ActivationSparsityConfig(**kw)


def test_histogram_threshold_matches_quantiles():
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    h = Histogram.of(x)
    habs = Histogram.of(x.abs())
    for s in (0.25, 0.4, 0.5, 0.65):
        expect = float(torch.quantile(x.abs()[:100_000], s))
        assert h.threshold(s) == pytest.approx(expect, abs=0.02)  # icdf(0.5 + s/2), symmetric input
        assert habs.threshold(s, signed=False) == pytest.approx(expect, abs=0.02)
    assert h.threshold(0.0) == 0.0


def test_histogram_follows_teal_binning():
    x = torch.linspace(-10, 10, 10_001)
    h = Histogram.of(x)
    assert h.centers.numel() == 10_000  # 9,998 bins between the 1%/99% quantiles + 2 overflow bins
    assert float(h.cumulative[-1]) == x.numel()
    assert float(h.centers[0]) < -9.8 < float(h.centers[1])  # first bin runs from the minimum to the 1% quantile


def test_signed_and_abs_differ_on_skewed_inputs():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1)) + 1.0  # mean 1: not symmetric
    signed, absolute = Histogram.of(x).threshold(0.5), Histogram.of(x.abs()).threshold(0.5, signed=False)
    assert absolute == pytest.approx(float(torch.quantile(x.abs()[:100_000], 0.5)), abs=0.02)
    assert abs(signed - absolute) > 0.1


def test_greedy_error_is_teals():
    target, out = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
    manual = torch.norm(target[:, 6:] - out[:, 6:], dim=1).mean()  # last 25% of 8 positions, norm over positions
    assert float(_position_norms(target, out, 0.25).mean()) == pytest.approx(float(manual), rel=1e-6)


def test_closest_step_is_teals_lookup():
    path = [GreedyStep(0.1, 0, {"a": 0.1}), GreedyStep(0.28, 0, {"a": 0.28}), GreedyStep(0.34, 0, {"a": 0.34})]
    assert _closest(path, ["a"], 0.3) == {"a": 0.28}
    assert _closest([], ["a"], 0.3) == {"a": 0.0}


def test_uniform_replaces_every_projection_and_hits_the_sparsity():
    model = tiny_model("llama").eval()
    calib = _calib()
    report = sparsify_activations_(model, _cfg(sparsity=0.5), calibration=calib, progress=False)
    layers = sparse_input_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{b}.{blk}.{p}" for b in range(2) for p in PROJ
                                    for blk in (["self_attn"] if p in PROJ[:4] else ["mlp"]))
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, SparseInputLinear)
    for layer in report.layers:
        assert layer.sparsity == 0.5
        assert layer.calibration_sparsity == pytest.approx(0.5, abs=0.05)
        assert layers[layer.name].threshold.item() == pytest.approx(layer.threshold)
    by_name = {t.name: t.threshold for t in report.layers}
    # q, k, v share one input distribution: same threshold under uniform, but each its own module
    assert by_name["model.layers.0.self_attn.q_proj"] == by_name["model.layers.0.self_attn.k_proj"]
    assert layers["model.layers.0.self_attn.q_proj"] is not layers["model.layers.0.self_attn.k_proj"]


def test_measured_sparsity_at_inference_is_the_target():
    model = tiny_model("llama").eval()
    sparsify_activations_(model, _cfg(sparsity=0.4), calibration=_calib(16), progress=False)
    for layer in sparse_input_layers(model).values():
        layer.track_sparsity = True
    with torch.no_grad():
        model(input_ids=_calib(8, 16, seed=5))
    measured = [m.measured_sparsity() for m in sparse_input_layers(model).values()]
    assert sum(measured) / len(measured) == pytest.approx(0.4, abs=0.08)


def test_sparsity_zero_keeps_the_model_exact():
    model = tiny_model("llama").eval()
    ids = _calib(2, 12, seed=3)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    sparsify_activations_(model, _cfg(sparsity=0.0), calibration=_calib(), progress=False)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_generate_runs_sparse_and_changes_with_sparsity():
    model = tiny_model("llama").eval()
    ids = _calib(1, 6, seed=4)
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    sparsify_activations_(model, _cfg(sparsity=0.5), calibration=_calib(), progress=False)
    out = model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)
    with torch.no_grad():
        sparse_logits = model(input_ids=ids).logits
    assert not torch.allclose(sparse_logits, dense_logits, atol=1e-3)


def test_token_fraction_switches_teals_convention():
    model = tiny_model("llama").eval()
    sparsify_activations_(model, _cfg(sparsity=0.5), calibration=_calib(), progress=False)
    set_token_fraction(model, 0.5)
    assert all(m.token_fraction == 0.5 for m in sparse_input_layers(model).values())
    with pytest.raises(ConfigError):
        set_token_fraction(model, 1.5)
    with pytest.raises(ModelError, match="SparseInputLinear"):
        set_token_fraction(tiny_model("llama"), 0.5)


def test_greedy_reaches_the_target_with_teals_steps():
    model = tiny_model("llama").eval()
    cfg = _cfg(sparsity=0.3, allocation="greedy", greedy_samples=4)
    report = sparsify_activations_(model, cfg, calibration=_calib(), progress=False)
    for b, path in report.greedy.items():
        assert path, f"block {b} took no greedy step"
        effs = [s.effective for s in path]
        assert effs == sorted(effs) and effs[-1] >= 0.3 > (effs[-2] if len(effs) > 1 else 0.0)
        # each step moves one projection by 0.05 / w_p (w: params relative to q_proj; q 32x32, k/v 16x32, MLP 64x32)
        weights = {"self_attn.q_proj": 1, "self_attn.k_proj": 0.5, "self_attn.v_proj": 0.5, "self_attn.o_proj": 1,
                   "mlp.gate_proj": 2, "mlp.up_proj": 2, "mlp.down_proj": 2}
        prev = {n: 0.0 for n in weights}
        for step in path:
            moved = [n for n in weights if step.sparsities[n] != prev[n]]
            assert len(moved) == 1
            assert step.sparsities[moved[0]] - prev[moved[0]] == pytest.approx(0.05 / weights[moved[0]])
            prev = step.sparsities
    assert abs(report.effective_sparsity(model) - 0.3) < 0.02


def test_greedy_spends_sparsity_where_it_costs_nothing():
    model = tiny_model("llama").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()  # attention contributes nothing: its inputs are free to drop
    cfg = _cfg(sparsity=0.15, allocation="greedy", greedy_samples=4)
    report = sparsify_activations_(model, cfg, calibration=_calib(), progress=False)
    for path in report.greedy.values():
        last = path[-1].sparsities
        assert all(last[f"mlp.{p}"] == 0.0 for p in ("gate_proj", "up_proj", "down_proj"))


def test_bad_configs_and_models():
    for s in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            ActivationSparsityConfig(sparsity=s)
    with pytest.raises(ConfigError, match="allocation"):
        ActivationSparsityConfig(allocation="owl")
    with pytest.raises(ConfigError, match="method"):
        ActivationSparsityConfig(method="cats2")
    with pytest.raises(ModelError, match="no supported projections|repeated transformer blocks"):
        sparsify_activations_(nn.Sequential(nn.ReLU()), _cfg(), calibration=_calib(), progress=False)
    with pytest.raises(DataError, match="calibration"):
        sparsify_activations_(tiny_model("llama"), _cfg(), progress=False)
    with pytest.raises(ConfigError, match="Conv1D"):
        sparsify_activations_(tiny_model("gpt2"), _cfg(), calibration=_calib(), progress=False)


def test_nan_activations_name_the_layer():
    model = tiny_model("llama").eval()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        sparsify_activations_(model, _cfg(), calibration=_calib(), progress=False)
    assert not sparse_input_layers(model)  # nothing replaced


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_llama_like_families(family):
    model = tiny_model(family).eval()
    sparsify_activations_(model, _cfg(sparsity=0.4), calibration=_calib(), progress=False)
    assert len(sparse_input_layers(model)) == 14
    assert model.generate(input_ids=_calib(1, 4), max_new_tokens=3, do_sample=False, min_new_tokens=3).shape == (1, 7)


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_retarget_reuses_the_calibration(allocation):
    model = tiny_model("llama").eval()
    report = sparsify_activations_(model, _cfg(sparsity=0.5, allocation=allocation, greedy_samples=4),
                                   calibration=_calib(), progress=False)
    at_half = {t.name: t.threshold for t in report.layers}
    report.retarget_(model, 0.25)
    layers = sparse_input_layers(model)
    assert all(layers[t.name].threshold.item() <= at_half[t.name] * (1 + 1e-6) for t in report.layers)
    assert abs(report.effective_sparsity(model) - 0.25) < 0.03
    report.retarget_(model, 0.0)
    assert all(m.threshold.item() == 0.0 for m in layers.values())
    if allocation == "greedy":
        with pytest.raises(ConfigError, match="calibrate with sparsity"):
            report.retarget_(model, 0.7)


def test_cats_thresholds_the_gate_output():
    from sparseforge.activation.cats import CATSMLP

    model = tiny_model("llama").eval()
    ids = _calib(2, 12, seed=3)
    report = sparsify_activations_(model, _cfg(method="cats", sparsity=0.5), calibration=_calib(), progress=False)
    mlps = [m for m in model.modules() if isinstance(m, CATSMLP)]
    assert len(mlps) == 2 and len(report.layers) == 2
    assert all(t.calibration_sparsity == pytest.approx(0.5, abs=0.05) for t in report.layers)
    assert report.effective_sparsity(model) == pytest.approx(0.5 * 2 / 3, abs=1e-6)  # gate_proj stays dense
    # the MLP equals the dense one on the thresholded gate output, at decode (1 token) and prefill
    mlp = mlps[0]
    for x in (torch.randn(1, 1, 32), torch.randn(2, 5, 32)):
        a = mlp.act_fn(mlp.gate_proj(x))
        a = torch.where(a.abs() <= mlp.threshold, 0.0, a)
        expect = nn.functional.linear(a * mlp.up_proj(x), mlp.down_proj.weight)
        torch.testing.assert_close(mlp(x), expect, rtol=1e-4, atol=1e-5)
    assert model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False, min_new_tokens=3).shape == (1, 7)
    report.retarget_(model, 0.0)
    assert all(m.threshold.item() == 0.0 for m in mlps)
    with pytest.raises(ConfigError, match="uniform"):
        ActivationSparsityConfig(method="cats", allocation="greedy")


def test_sparse_model_under_torch_compile_matches_eager():
    model = tiny_model("llama").eval()
    sparsify_activations_(model, _cfg(sparsity=0.5), calibration=_calib(), progress=False)
    ids = _calib(2, 8, seed=9)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="aot_eager")(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_bfloat16_model_keeps_bfloat16_weights():
    model = tiny_model("llama", dtype=torch.bfloat16).eval()
    sparsify_activations_(model, _cfg(sparsity=0.4), calibration=_calib(), progress=False)
    layers = sparse_input_layers(model)
    assert layers and all(m.weight_t.dtype == torch.bfloat16 for m in layers.values())
    out = model.generate(input_ids=_calib(1, 4), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_calib(2, 6)).logits.float()).all()


def test_stacked_greedy_trials_equal_one_forward_per_trial(monkeypatch):
    """The greedy search stacks a step's trials in one batch; one forward per trial gives the same path."""
    from sparseforge.activation import teal

    paths = {}
    for tokens in (1, teal.TRIAL_TOKENS):
        monkeypatch.setattr(teal, "TRIAL_TOKENS", tokens)
        model = tiny_model("llama").eval()
        report = sparsify_activations_(model, _cfg(sparsity=0.2, allocation="greedy", greedy_samples=8),
                                       calibration=_calib(), progress=False)
        paths[tokens] = report.greedy
    one, stacked = paths.values()
    for b in one:
        assert [s.sparsities for s in one[b]] == [s.sparsities for s in stacked[b]]
        assert [s.error for s in one[b]] == pytest.approx([s.error for s in stacked[b]], rel=1e-4)
