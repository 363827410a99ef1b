"""ProSparse (Song et al. 2024): the staged sine schedule of the L1 factor, the L1 term's gradient
through FinetuneConfig(l1_schedule=...), and activation threshold shifting (FATReLU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseforge.activation.cats import CATSMLP
from sparseforge.activation.l1_schedule import L1Schedule
from sparseforge.activation.relufy import (FATRELU_KEY, ActivationL1, FATReLU, gate_sparsity, relu_sparse_, relufy_,
                                           shift_activation_threshold_)
from sparseforge.errors import ConfigError, ModelError
from sparseforge.finetune import FinetuneConfig, finetune_
from tiny_models import VOCAB, tiny_model, tokens


class GLU(nn.Module):
    def __init__(self, d: int, f: int, act: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ---- schedule -----------------------------------------------------------------------------------------


def test_schedule_values_follow_the_staged_sine():
    s = L1Schedule([(0.01, 4), (0.1, 12), (0.1, 14), (0.5, 18)])
    assert [s.value(t) for t in (0, 1, 4)] == [0.01, 0.01, 0.01]  # warm-up: the constant
    for t in range(5, 13):  # stage 1: 0.01 -> 0.1 along a quarter sine over steps 4..12
        assert s.value(t) == pytest.approx(0.01 + 0.09 * math.sin(math.pi / 2 * (t - 4) / 8), rel=1e-12)
    assert s.value(8) == pytest.approx(0.01 + 0.09 * math.sqrt(0.5))  # halfway in time: sin(pi/4) of the rise
    assert s.value(13) == s.value(14) == 0.1  # an equal-factor stage holds it
    assert s.value(16) == pytest.approx(0.1 + 0.4 * math.sin(math.pi / 4))
    assert s.value(18) == s.value(10_000) == 0.5 and s.total_steps == 18
    assert L1Schedule.single(2.0, 4).value(2) == pytest.approx(2.0 * math.sin(math.pi / 4))


stages_strategy = st.lists(st.tuples(st.floats(0, 1), st.integers(1, 50)), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 0.1), st.integers(0, 20), stages_strategy)
def test_schedule_is_non_decreasing_continuous_and_hits_each_stage_factor(lam0, t0, raw):
    factors = sorted([lam0] + [f for f, _ in raw])  # progressive
    ends = [t0]
    for _, length in raw:
        ends.append(ends[-1] + length)
    s = L1Schedule(list(zip(factors, ends)))
    values = [s.value(t) for t in range(0, ends[-1] + 3)]
    assert all(b >= a - 1e-15 for a, b in zip(values, values[1:]))
    assert all(factors[0] - 1e-15 <= v <= factors[-1] + 1e-15 for v in values)
    for lam, end in zip(factors, ends):
        assert s.value(end) == pytest.approx(lam, abs=1e-12)
    # one step never jumps more than the stage's rise times sin(pi / 2 / length) (the steepest step)
    for (lo, a), (hi, b) in zip(s.stages, s.stages[1:]):
        steepest = (hi - lo) * math.sin(math.pi / 2 / (b - a))
        assert all(s.value(t + 1) - s.value(t) <= steepest + 1e-12 for t in range(a, b))


@pytest.mark.parametrize("stages, message", [
    ([], "non-empty"),
    ([(0.1, 5), (0.05, 10)], "progressive"),
    ([(0.0, 5), (0.1, 5)], "increasing"),
    ([(-0.1, 5)], ">= 0"),
    ([(float("nan"), 5)], ">= 0"),
    ([(0.1, 2.5)], "integer"),
    ([(0.1,)], r"\[factor, end step\]"),
])
def test_bad_schedules_are_config_errors(stages, message):
    with pytest.raises(ConfigError, match=message):
        L1Schedule(stages)
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(loss="ce", allow_dense=True, l1_schedule=stages)


def test_even_schedule_and_config_round_trip():
    s = L1Schedule.even([0.1, 0.2, 0.4], steps=40, warmup=10)
    assert s.stages == [(0.0, 10), (0.1, 20), (0.2, 30), (0.4, 40)]
    cfg = FinetuneConfig(loss="ce", allow_dense=True, l1_schedule=s)
    assert cfg.l1_schedule == [[0.0, 10], [0.1, 20], [0.2, 30], [0.4, 40]]  # JSON-able for the resume state
    assert FinetuneConfig.from_dict(cfg.to_dict()).l1_schedule == cfg.l1_schedule
    with pytest.raises(ConfigError, match="adapter"):
        FinetuneConfig(loss="ce", adapter="lora", l1_schedule=s)


# ---- the L1 term -------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [2, 5, 9])
def test_l1_gradient_at_a_step_equals_that_of_the_explicit_penalty_with_the_scheduled_factor(step):
    torch.manual_seed(step)
    model = nn.ModuleDict({"mlp": GLU(8, 16, nn.ReLU())})
    twin = copy.deepcopy(model)
    schedule = L1Schedule([(0.0, 1), (0.2, 6), (0.8, 10)])
    x = torch.randn(5, 8)
    l1 = ActivationL1(model, schedule=schedule)
    l1.set_step(step)
    lam = schedule.value(step)
    assert l1.lam == lam > 0
    model["mlp"](x).sum().backward()
    l1.remove()
    acts = []
    handle = twin["mlp"].act_fn.register_forward_hook(lambda m, a, out: acts.append(out))
    out = twin["mlp"](x)
    (out.sum() + lam * acts[0].abs().mean()).backward()
    handle.remove()
    assert l1.penalty == pytest.approx(lam * float(acts[0].detach().abs().mean()), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    with pytest.raises(ConfigError, match="not both"):
        ActivationL1(model, peak=0.1, warmup=3, schedule=schedule)


def test_finetune_applies_the_schedule_step_by_step_and_reports_the_term():
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    relufy_(student, "relu")
    schedule = [[0.0, 3], [0.5, 8], [2.0, 12]]
    seen = []
    data = torch.randint(2, VOCAB, (6000,), generator=torch.Generator().manual_seed(0))
    cfg = FinetuneConfig(loss="ce+kd", steps=12, lr=3e-3, allow_dense=True, batch_size=2, seqlen=16,
                         l1_schedule=schedule)
    finetune_(student, cfg, teacher=teacher, data=data, kind="causal-lm", evaluate=False, progress=False,
              callback=lambda info: seen.append((info.step, info.parts["l1"])))
    assert [step for step, _ in seen] == list(range(1, 13))
    assert all(v == 0.0 for step, v in seen if step <= 3)  # warm-up factor 0: no term
    assert all(v > 0.0 for step, v in seen if step > 3)
    # the hooks are gone afterwards: a backward adds nothing
    act = student.model.layers[0].mlp.act_fn
    assert not act._forward_hooks


def test_progressive_schedule_raises_gate_sparsity_over_plain_recovery():
    teacher = tiny_model("llama")
    data = torch.randint(2, VOCAB, (6000,), generator=torch.Generator().manual_seed(0))
    ids = tokens(4, 32, seed=9)
    sparsity = {}
    for label, schedule in (("plain", None), ("prosparse", L1Schedule.even([0.5, 2.0], steps=30, warmup=5))):
        student = copy.deepcopy(teacher)
        relufy_(student, "relu")
        cfg = FinetuneConfig(loss="ce+kd", steps=30, lr=3e-3, allow_dense=True, batch_size=4, seqlen=32,
                             l1_schedule=schedule)
        finetune_(student, cfg, teacher=teacher, data=data, kind="causal-lm", evaluate=False, progress=False)
        sparsity[label] = gate_sparsity(student, ids)
    assert sparsity["prosparse"] > sparsity["plain"] + 0.05, sparsity


# ---- threshold shifting (FATReLU) -------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 2), st.integers(0, 2**31 - 1))
def test_fatrelu_zeroes_exactly_the_values_below_the_threshold(threshold, seed):
    threshold = float(torch.tensor(threshold))  # a float32 value: x holds it exactly
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 2
    x[:3] = torch.tensor([threshold, -threshold, 0.0])
    x.requires_grad_(True)
    y = FATReLU(threshold)(x)
    kept = (x.detach() >= threshold) & (x.detach() > 0)  # x >= t kept (threshold 0: ReLU, 0 maps to 0)
    assert torch.equal(y.detach(), torch.where(kept, x.detach(), torch.zeros(())))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float())
    if threshold == 0:
        assert torch.equal(y.detach(), torch.relu(x.detach()))


def test_fatrelu_refuses_bad_thresholds():
    for bad in (-0.1, float("inf"), float("nan"), True, "0.1"):
        with pytest.raises(ConfigError, match="FATReLU threshold"):
            FATReLU(bad)


def _gate_inputs(model, ids):
    pre = []
    hooks = [m.gate_proj.register_forward_hook(lambda mod, a, out: pre.append(out.detach().reshape(-1)))
             for m in model.modules() if hasattr(m, "gate_proj")]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return torch.cat(pre)


def test_shift_zeroes_the_gate_outputs_below_the_threshold_and_skipping_stays_lossless():
    model = tiny_model("llama")
    relufy_(model, "relu")
    ids = tokens(2, 16, seed=4)
    pre = _gate_inputs(model, ids)
    before = gate_sparsity(model, ids)
    assert before == pytest.approx(float((pre <= 0).float().mean()))
    t = float(pre[pre > 0].quantile(0.3))  # 30% of the positive gate outputs fall below it
    assert shift_activation_threshold_(model, t) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert getattr(model.config, FATRELU_KEY) == t
    after = gate_sparsity(model, ids)
    shifted_pre = _gate_inputs(model, ids)  # layer 1's inputs change with layer 0's gate
    assert after == pytest.approx(float((shifted_pre < t).float().mean()))
    assert after > before + 0.1
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    relu_sparse_(model)  # threshold 0 on the FATReLU output: exact zeros only
    assert all(isinstance(m, CATSMLP) for m in model.model.layers.modules() if hasattr(m, "gate_proj"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_shift_refuses_a_gate_that_is_not_relu():
    with pytest.raises(ModelError, match="SiLU.*relufy_"):
        shift_activation_threshold_(tiny_model("llama"), 0.01)
    model = tiny_model("llama")
    relufy_(model, "relu2")
    with pytest.raises(ModelError, match="SquaredReLU"):
        shift_activation_threshold_(model, 0.01)
    relufy_(model, "relu")
    with pytest.raises(ConfigError, match="threshold"):
        shift_activation_threshold_(model, -1.0)
    assert isinstance(model.model.layers[0].mlp.act_fn, nn.ReLU)  # nothing changed


@pytest.mark.parametrize("sparse_run", [False, True])
def test_the_shifted_threshold_round_trips_through_the_checkpoint(tmp_path, sparse_run):
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.loading import load

    model = tiny_model("llama")
    relufy_(model, "relu")
    shift_activation_threshold_(model, 0.05)
    if sparse_run:
        relu_sparse_(model)
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded = load(save_pretrained(model, tmp_path / "c", compressed=False))
    gates = [m.act_fn for m in loaded.modules() if hasattr(m, "gate_proj")]
    assert gates and all(isinstance(g, FATReLU) and g.threshold == 0.05 for g in gates)
    assert all(isinstance(m, CATSMLP) for m in loaded.modules() if hasattr(m, "gate_proj")) == sparse_run
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
