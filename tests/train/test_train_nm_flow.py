"""N:M trainer options: progressive gradient flow (MDGF, Bambhaniya et al. 2024) and transposable masks."""

import math

import pytest
import torch
from torch import nn

import sparseforge.train as sft
from sparseforge.errors import ConfigError
from sparseforge.masks import mask_from_scores, satisfies, transposable_mask
from sparseforge.train.nm import flow_factor


def _net(seed=0, widths=(8, 16, 4)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(widths[0], widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2]))


def _train(net, opt, trainer, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        net(torch.randn(4, net[0].in_features, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        trainer.step()


def test_flow_factor_formulas():
    assert flow_factor(0, "linear", 0.1) == 1.0
    assert flow_factor(3, "linear", 0.1) == pytest.approx(0.7)
    assert flow_factor(20, "linear", 0.1) == 0.0  # clamped at 0
    assert flow_factor(7, "exp", 0.2) == pytest.approx(math.exp(-1.4))
    assert flow_factor(4, "exp", 0.2, start=10) == 1.0  # dense before the start step
    assert flow_factor(15, "linear", 0.1, start=10) == pytest.approx(0.5)
    assert flow_factor(15, "none", 0.0) == 0.0


@pytest.mark.parametrize("cls,kind", [(sft.STE, "linear"), (sft.SRSTE, "exp")])
def test_forward_uses_the_decayed_mask_and_backward_stays_straight_through(cls, kind):
    net = _net(2)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    trainer = cls(net, opt, pattern="1:4", flow_decay=kind, flow_decay_coef=0.1, flow_decay_start=2)
    assert trainer.flow == 1.0  # before the start step the forward is dense
    for layer in trainer.layers:
        torch.testing.assert_close(layer.module.weight, layer.weight)
    _train(net, opt, trainer, 5)
    beta = flow_factor(5, kind, 0.1, start=2)
    assert trainer.flow == pytest.approx(beta) and 0 < beta < 1
    x = torch.randn(3, 8)
    for layer in trainer.layers:
        m = layer.mask
        torch.testing.assert_close(layer.module.weight, layer.weight * (m + beta * (~m)))
    # backward: the same straight-through gradient (+ SR-STE term) as without the decay
    net(x).square().mean().backward()
    w0 = net[0].weight.detach().requires_grad_()
    h = torch.relu(x @ w0.t() + net[0].bias.detach())
    (h @ net[2].weight.detach().t() + net[2].bias.detach()).square().mean().backward()
    expected = w0.grad + trainer.decay * (~trainer.layers[0].mask) * trainer.layers[0].weight
    torch.testing.assert_close(trainer.layers[0].param.grad, expected)


def test_finalize_is_nm_even_while_beta_is_positive():
    net = _net(4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    trainer = sft.STE(net, opt, pattern="2:4", flow_decay="exp", flow_decay_coef=1e-3)
    _train(net, opt, trainer, 3)
    assert trainer.flow > 0.99
    trainer.finalize()
    for module in (net[0], net[2]):
        assert satisfies(module.weight != 0, "2:4") and float((module.weight == 0).float().mean()) == 0.5


def test_flow_config_validated_and_round_trips():
    with pytest.raises(ConfigError, match="needs flow_decay_coef > 0"):
        sft.STEConfig(flow_decay="linear")
    with pytest.raises(ConfigError, match="unknown flow_decay"):
        sft.STEConfig(flow_decay="cosine", flow_decay_coef=0.1)
    with pytest.raises(ConfigError, match="flow_decay_start"):
        sft.SRSTEConfig(flow_decay="exp", flow_decay_coef=0.1, flow_decay_start=-1)
    cfg = sft.SRSTEConfig(pattern="1:4", flow_decay="exp", flow_decay_coef=2e-3, flow_decay_start=100)
    assert sft.parse_train_recipe(sft.dump_train_recipe(cfg)) == cfg


def test_flow_resume_restores_beta():
    net = _net(5)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    trainer = sft.STE(net, opt, pattern="1:4", flow_decay="linear", flow_decay_coef=0.1)
    _train(net, opt, trainer, 4)
    state = trainer.state_dict()
    net2 = _net(5)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.05)
    trainer2 = sft.STE(net2, opt2, pattern="1:4", flow_decay="linear", flow_decay_coef=0.1)
    net2.load_state_dict(net.state_dict())
    trainer2.load_state_dict(state)
    assert trainer2.layers[0].module.parametrizations.weight[0].flow == pytest.approx(0.6)
    torch.testing.assert_close(net2[0].weight, net[0].weight)


@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_transposable_masks_in_training(pattern):
    net = _net(6, widths=(8, 16, 8))
    opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9)
    trainer = sft.SRSTE(net, opt, pattern=pattern, transposable=True)
    n, m = map(int, pattern.split(":"))
    for _ in range(4):
        _train(net, opt, trainer, 1)
        for layer in trainer.layers:
            assert satisfies(layer.mask, pattern) and satisfies(layer.mask.t(), pattern)
            assert int(layer.mask.sum()) == layer.mask.numel() * n // m
            assert torch.equal(layer.mask, transposable_mask(layer.weight.abs(), pattern))
    trainer.finalize()
    for module in (net[0], net[2]):
        assert satisfies(module.weight != 0, pattern) and satisfies(module.weight.t() != 0, pattern)


def test_transposable_needs_out_features_divisible_by_m():
    net = _net(0, widths=(8, 16, 6))
    with pytest.raises(ConfigError, match="layer 2: out_features=6 is not divisible by M=4"):
        sft.STE(net, torch.optim.SGD(net.parameters(), lr=0.1), pattern="2:4", transposable=True)
    sft.STE(net, torch.optim.SGD(net.parameters(), lr=0.1), pattern="2:4")  # fine without the option


def test_plain_masks_unchanged_by_the_options_defaults():
    net = _net(8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = sft.STE(net, opt, pattern="2:4")
    assert trainer.flow == 0.0
    _train(net, opt, trainer, 2)
    for layer in trainer.layers:
        assert torch.equal(layer.mask, mask_from_scores(layer.weight.abs(), "2:4"))
        assert torch.equal(layer.module.weight, layer.weight * layer.mask)
