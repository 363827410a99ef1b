import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from sparseforge.errors import ConfigError
from sparseforge.masks import mask_from_scores
from sparseforge.patterns import FanIn
from sparseforge.train import SRigL, SRigLConfig, dump_train_recipe, from_config, parse_train_recipe
from sparseforge.train.srigl import srigl_update
from train_helpers import DST, assert_resume_bit_exact, batch, mlp



def test_update_hand_made():
    w = torch.tensor([[0.9, 0.8, 0.0, 0.0], [0.05, 0.0, 0.04, 0.0], [0.0, 0.7, 0.0, 0.6]])
    g = torch.tensor([[0.0, 0.0, 0.1, 0.2], [0.0, 0.01, 0.0, 0.02], [0.3, 0.0, 0.5, 0.0]])
    mask = w != 0
    # unstructured RigL (K = 3): keep |w| 0.9 0.8 0.7, grow |g| 0.5 0.3 0.2 -> salient per row 3, 0, 3;
    # gamma 0.5 * k0 2 = 1 ablates row 1; k = 6 // 2 = 3; drop keeps 0.9 0.8 0.7; fill rows to 3 by |g|
    new, alive, k = srigl_update(mask, w.abs(), g.abs(), budget=6, drop_fraction=0.5, gamma_sal=0.5)
    assert alive.tolist() == [True, False, True] and k == 3
    assert new.int().tolist() == [[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]]
    # without ablation every row keeps k0 = 2: row 1 keeps nothing of its own after the drop, grows 2 by |g|
    new, alive, k = srigl_update(mask, w.abs(), g.abs(), budget=6, drop_fraction=0.5, gamma_sal=0.5, ablate=False)
    assert alive.all() and k == 2
    assert new.int().tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 1, 1, 0]]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 12), density=st.floats(0.05, 1.0), fraction=st.floats(0.0, 0.9),
       gamma=st.floats(0.0, 1.0), seed=st.integers(0, 10_000), ablate=st.booleans())
def test_update_invariants(rows, cols, density, fraction, gamma, seed, ablate):
    gen = torch.Generator().manual_seed(seed)
    k0 = max(1, round(density * cols))
    mask = mask_from_scores(torch.rand(rows, cols, generator=gen), FanIn(k0))
    w = torch.randn(rows, cols, generator=gen) * mask
    g = torch.randn(rows, cols, generator=gen).round(decimals=1)  # ties included
    budget = k0 * rows
    new, alive, k = srigl_update(mask, w.abs(), g.abs(), budget, fraction, gamma, ablate)
    n_alive = int(alive.sum())
    assert n_alive >= math.ceil(budget / cols) and k == budget // n_alive and k <= cols
    per_row = new.sum(1)
    assert bool((per_row[alive] == k).all()) and not new[~alive].any()  # constant fan-in, ablated rows empty
    assert budget - n_alive < int(new.sum()) <= budget
    if not ablate or gamma == 0:
        assert alive.all() and k == k0
    # a kept old weight is never smaller than a dropped old weight of an alive neuron (magnitude drop)
    kept, dropped = new & mask, mask & ~new & alive.reshape(-1, 1)
    if kept.any() and dropped.any():
        assert float(w.abs()[kept].min()) >= float(w.abs()[dropped].max()) or fraction > 0


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_trainer_constant_fan_in_and_optimizer_state(opt_name):
    net = mlp()
    if opt_name == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        keys = ["momentum_buffer"]
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        keys = ["exp_avg", "exp_avg_sq"]
    tr = SRigL(net, opt, sparsity=0.75, schedule=DST, gamma_sal=0.6)
    budget = dict(tr.budget)
    assert all(b == l.mask.sum(1)[0] * l.mask.shape[0] for l, b in zip(tr.layers, budget.values()))
    ablations = 0
    for i in range(40):
        x, y = batch(i)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step(); opt.zero_grad()
        before = {l.name: l.mask.clone() for l in tr.layers}
        up = tr.step()
        for l in tr.layers:
            per_row = l.mask.sum(1)
            alive = per_row > 0
            assert bool((per_row[alive] == tr.fan_in[l.name]).all())
            assert budget[l.name] - int(alive.sum()) < int(l.mask.sum()) <= budget[l.name]
            assert not l.weight[~l.mask].any()
            for key in keys:
                assert not l.view(opt.state[l.param][key])[~l.mask].any()
            if up is not None:
                grown = l.mask & ~before[l.name]
                assert not l.weight[grown].any()
                for key in keys:
                    assert not l.view(opt.state[l.param][key])[grown].any()
        if up is not None:
            ablations += sum(tr.ablated.values())
    assert tr.ablated[tr.layers[-1].name] == 0  # output neurons are never ablated by default
    assert tr.layers[-1].mask.any(1).all()
    assert ablations > 0  # gamma_sal 0.6 switches some hidden neurons off on this task


def test_resume_is_bit_exact():
    def fresh():
        net = mlp(seed=3)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        return net, opt, SRigL(net, opt, sparsity=0.8, schedule=DST, gamma_sal=0.5)

    assert_resume_bit_exact(fresh, split=12)


def test_config_and_recipe():
    cfg = SRigLConfig(sparsity=0.9, distribution="erk", gamma_sal=0.3, schedule={"end_step": 100, "update_interval": 10})
    assert cfg.pattern == "fanin" and cfg.drop_fraction_decay == "cosine"
    assert parse_train_recipe(dump_train_recipe(cfg)) == cfg
    with pytest.raises(ConfigError, match="constant fan-in"):
        SRigLConfig(sparsity=0.9, pattern="unstructured", schedule={"end_step": 100, "update_interval": 10})
    with pytest.raises(ConfigError, match="gamma_sal"):
        SRigLConfig(sparsity=0.9, gamma_sal=1.5, schedule={"end_step": 100, "update_interval": 10})
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert isinstance(from_config(net, opt, cfg), SRigL)
