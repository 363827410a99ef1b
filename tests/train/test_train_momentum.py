
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from sparseforge.errors import ConfigError
from sparseforge.train import SparseMomentum, SparseMomentumConfig, dump_train_recipe, parse_train_recipe
from sparseforge.train.momentum import apportion
from train_helpers import DST, assert_resume_bit_exact, batch, mlp



def test_apportion_formula():
    assert apportion(10, [1, 1, 2], [10, 10, 10]) == [3, 2, 5]  # 2.5, 2.5, 5: the lower index gets the remainder
    assert apportion(10, [1, 9], [20, 3]) == [7, 3]  # capped at 3, the rest goes to the other layer
    assert apportion(4, [0, 0], [1, 3]) == [1, 3]  # no momentum anywhere: by free capacity
    with pytest.raises(ConfigError):
        apportion(5, [1], [4])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.integers(0, 50)), min_size=1, max_size=6), st.data())
def test_apportion_properties(entries, data):
    weights, caps = zip(*entries)
    total = data.draw(st.integers(0, sum(caps)))
    alloc = apportion(total, weights, caps)
    assert sum(alloc) == total and all(0 <= a <= c for a, c in zip(alloc, caps))


def test_update_hand_made():
    net = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    tr = SparseMomentum(net, opt, sparsity=0.5, drop_fraction=0.5, drop_fraction_decay="constant",
                        schedule={"start_step": 0, "end_step": 10, "update_interval": 1})
    a, b = tr.layers
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.3, 0.0, 0.2, 0.0]]))
        a.mask.copy_(net[0].weight != 0)
        net[1].weight.copy_(torch.tensor([[0.4, 0.0], [0.0, 0.6]]))
        b.mask.copy_(net[1].weight != 0)
    tr.momentum["0"].copy_(torch.tensor([[1.0, 1.0, 9.0, 0.0], [1.0, 8.0, 1.0, 7.0]]))  # mean over active: 1
    tr.momentum["1"].copy_(torch.tensor([[3.0, 5.0], [0.0, 3.0]]))  # mean over active: 3
    (net(torch.ones(1, 4)).sum() * 0).backward()  # zero gradient: the buffers become 0.9 * M
    opt.step(); opt.zero_grad()
    up = tr.step()
    # prune: layer 0 drops 2 of 4 (|w| 0.1, 0.2), layer 1 drops 1 of 2 (0.4): K = 3, shares 1 : 3 -> 0.75, 2.25
    # -> 1 and 2 (largest remainder). Layer 0 regrows |M| 9; layer 1 has 3 free entries, grows |M| 5 and 3
    assert a.mask.int().tolist() == [[1, 0, 1, 0], [1, 0, 0, 0]]
    assert b.mask.int().tolist() == [[1, 1], [0, 1]]
    assert tr.num_active() == 6 and up.changed == {"0": (2, 1), "1": (0, 1)}
    assert tr.last_shares == pytest.approx({"0": 0.25, "1": 0.75})
    assert net[0].weight[0, 2] == 0  # grown at zero
    assert float(net[1].weight[0, 0].detach()) == pytest.approx(0.4)  # pruned and regrown in the same update: unchanged, as in RigL


def test_momentum_buffer_formula():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    tr = SparseMomentum(net, opt, sparsity=0.8, momentum=0.5, schedule={"end_step": 100, "update_interval": 50})
    expected = torch.zeros_like(tr.momentum["0"])
    for i in range(3):
        x, y = batch(i)
        w = net[0].weight.detach().clone()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        dense = tr.layers[0].grad.clone()  # stored before masking
        expected = 0.5 * expected + dense
        opt.step(); opt.zero_grad()
        tr.step()
    assert torch.allclose(tr.momentum["0"], expected)
    assert (expected[~tr.layers[0].mask] != 0).any()  # zero weights have momentum: that is what grows them


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_constant_total_count_and_optimizer_state(opt_name):
    net = mlp()
    if opt_name == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        keys = ["momentum_buffer"]
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        keys = ["exp_avg", "exp_avg_sq"]
    tr = SparseMomentum(net, opt, sparsity=0.8, distribution="erk", schedule=DST)
    total = tr.num_active()
    counts0 = {l.name: int(l.mask.sum()) for l in tr.layers}
    moved = False
    for i in range(40):
        x, y = batch(i)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step(); opt.zero_grad()
        before = {l.name: l.mask.clone() for l in tr.layers}
        up = tr.step()
        assert tr.num_active() == total
        for l in tr.layers:
            assert not l.weight[~l.mask].any()
            for key in keys:
                assert not l.view(opt.state[l.param][key])[~l.mask].any()
            if up is not None:
                grown = l.mask & ~before[l.name]
                assert not l.weight[grown].any()
        moved |= any(int(l.mask.sum()) != counts0[l.name] for l in tr.layers)
    assert moved  # the redistribution moves weights between layers


def test_resume_is_bit_exact():
    def fresh():
        net = mlp(seed=2)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        return net, opt, SparseMomentum(net, opt, sparsity=0.8, schedule=DST)

    assert_resume_bit_exact(fresh, split=13)


def test_config_errors_and_recipe():
    cfg = SparseMomentumConfig(sparsity=0.9, schedule={"end_step": 100, "update_interval": 10})
    assert cfg.drop_fraction == 0.5 and cfg.drop_fraction_decay == "cosine" and cfg.momentum == 0.9
    assert parse_train_recipe(dump_train_recipe(cfg)) == cfg
    with pytest.raises(ConfigError, match="unstructured"):
        SparseMomentumConfig(sparsity=0.9, pattern="fanin", schedule={"end_step": 100, "update_interval": 10})
    with pytest.raises(ConfigError, match="momentum"):
        SparseMomentumConfig(sparsity=0.9, momentum=1.0, schedule={"end_step": 100, "update_interval": 10})
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    tr = SparseMomentum(net, opt, sparsity=0.5, schedule=DST)
    with pytest.raises(ConfigError, match="every step"):
        tr.step()  # no backward pass
