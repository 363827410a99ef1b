"""SDGF (structure decay of the N:M pattern, Bambhaniya et al. 2024) for STE / SR-STE."""

import pytest
import torch
from torch import nn

import sparseforge.train as sft
from sparseforge.errors import ConfigError
from sparseforge.masks import satisfies
from sparseforge.patterns import NM
from sparseforge.train.nm import structure_schedule


def _net(seed=0, widths=(64, 64, 64)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(widths[0], widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2]))


def _step(net, opt, trainer, g):
    net(torch.randn(4, net[0].in_features, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return trainer.step()


@pytest.mark.parametrize("target,kind,levels,expected", [
    ("1:8", "stepwise", 3, ["7:8", "4:8", "2:8", "1:8"]),  # the paper's example
    ("2:4", "stepwise", 3, ["3:4", "2:4"]),
    ("1:4", "stepwise", 3, ["3:4", "2:4", "1:4"]),
    ("2:8", "stepwise", 3, ["7:8", "4:8", "2:8"]),
    ("3:4", "stepwise", 3, ["3:4"]),
    ("1:8", "geometric", 3, ["8:64", "4:32", "2:16", "1:8"]),  # the paper's example
    ("2:4", "geometric", 1, ["4:8", "2:4"]),
])
def test_structure_schedule(target, kind, levels, expected):
    n, m = map(int, target.split(":"))
    got = structure_schedule(NM(n, m), kind, levels)
    assert [str(p) for p in got] == expected
    if kind == "geometric":  # the density stays the target's
        assert {p.n / p.m for p in got} == {n / m}
    else:  # N strictly decreasing at fixed M
        assert all(a.n > b.n and a.m == b.m for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("cls", [sft.STE, sft.SRSTE])
@pytest.mark.parametrize("kind", ["stepwise", "geometric"])
def test_masks_follow_the_phases(cls, kind):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    start, end = 3, 11
    trainer = cls(net, opt, pattern="1:8", structure_decay=kind, structure_decay_start=start, structure_decay_end=end)
    seq = structure_schedule(NM(1, 8), kind, 3)
    assert trainer.current_pattern is None
    assert all(bool(layer.mask.all()) for layer in trainer.layers)  # dense phase
    g = torch.Generator().manual_seed(0)
    seen = []
    for t in range(1, 16):
        _step(net, opt, trainer, g)
        pattern = trainer.current_pattern
        if t < start:
            assert pattern is None and all(bool(layer.mask.all()) for layer in trainer.layers)
            continue
        expected = seq[(t - start) * len(seq) // (end - start)] if t < end else NM(1, 8)
        assert pattern == expected, t
        for layer in trainer.layers:
            assert satisfies(layer.mask, pattern)
            groups = layer.mask.reshape(layer.mask.shape[0], -1, pattern.m).sum(-1)
            assert bool((groups == pattern.n).all())  # exactly N per group (no ties in random weights)
            x = torch.randn(2, layer.module.in_features)
            torch.testing.assert_close(layer.module(x), x @ (layer.module.parametrizations.weight.original * layer.mask).T
                                       + layer.module.bias)
        seen.append(str(pattern))
    assert list(dict.fromkeys(seen)) == [str(p) for p in seq]  # every pattern had its turn, in order
    trainer.finalize()
    for layer in (net[0], net[2]):
        assert satisfies(layer.weight != 0, NM(1, 8))


def test_resume_restores_the_phase():
    kw = dict(pattern="1:8", structure_decay="stepwise", structure_decay_start=0, structure_decay_end=8)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    trainer = sft.STE(net, opt, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        _step(net, opt, trainer, g)
    state = trainer.state_dict()
    net2 = _net(seed=5)
    trainer2 = sft.STE(net2, torch.optim.SGD(net2.parameters(), lr=0.05), **kw)
    net2.load_state_dict(net.state_dict())
    trainer2.load_state_dict(state)
    assert trainer2.current_pattern == trainer.current_pattern == NM(4, 8)
    for a, b in zip(trainer.layers, trainer2.layers):
        assert torch.equal(a.mask, b.mask)
    net3 = _net()
    other = sft.STE(net3, torch.optim.SGD(net3.parameters(), lr=0.1), **{**kw, "structure_decay_end": 9})
    with pytest.raises(ConfigError, match="structure_decay_end"):
        other.load_state_dict(state)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown structure_decay 'fast'"):
        sft.STEConfig(pattern="1:8", structure_decay="fast")
    with pytest.raises(ConfigError, match="needs structure_decay_end > structure_decay_start"):
        sft.STEConfig(pattern="1:8", structure_decay="stepwise", structure_decay_start=5, structure_decay_end=5)
    with pytest.raises(ConfigError, match="transposable"):
        sft.STEConfig(pattern="2:4", structure_decay="stepwise", structure_decay_end=4, transposable=True)
    with pytest.raises(ConfigError, match="structure_decay is for STE / SR-STE"):
        sft.SSTEConfig(pattern="2:4", structure_decay="stepwise", structure_decay_end=4)
    with pytest.raises(ConfigError, match="structure_decay_levels must be 1..6"):
        sft.STEConfig(pattern="1:8", structure_decay="geometric", structure_decay_end=4, structure_decay_levels=9)
    net = _net(widths=(40, 16, 8))  # 40 inputs: fine for 1:8, not for geometric's 8:64
    with pytest.raises(ConfigError, match="in_features=40 is not divisible by M=64"):
        sft.STE(net, torch.optim.SGD(net.parameters(), lr=0.1), pattern="1:8", structure_decay="geometric",
                structure_decay_end=4)
