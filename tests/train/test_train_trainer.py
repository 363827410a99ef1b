import copy

import pytest
import torch
from torch import nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.masks import num_pruned, satisfies
from sparseforge.train import GMP, SET, RigL, StaticSparse
from sparseforge.train.base import MASK_BUFFER
from sparseforge.train.config import RigLConfig, SETConfig
from sparseforge.train.schedules import cubic_sparsity
from train_helpers import Conv1D

DST = {"start_step": 0, "end_step": 40, "update_interval": 5}


def mlp(seed=0, widths=(12, 24, 16, 4)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batch(i, d_in=12, d_out=4):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, d_in, generator=g), torch.randint(0, d_out, (16,), generator=g)


def train(net, opt, trainer, steps, start=0):
    updates = []
    for i in range(start, start + steps):
        x, y = batch(i)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        updates.append(trainer.step())
    return updates


def test_gmp_exact_sparsity_after_each_update():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = {"start_step": 5, "end_step": 35, "update_interval": 5}
    tr = GMP(net, opt, sparsity=0.9, initial_sparsity=0.2, schedule=sched)
    assert tr.num_active() == sum(l.mask.numel() for l in tr.layers)  # starts dense
    previous = {l.name: l.mask.clone() for l in tr.layers}
    seen = []
    for i in range(40):
        x, y = batch(i)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step(); opt.zero_grad()
        up = tr.step()
        t = i + 1
        if t in (5, 10, 15, 20, 25, 30, 35):
            assert up is not None and up.step == t
            seen.append(t)
            for l in tr.layers:
                n = l.mask.numel()
                assert int((~l.mask).sum()) == num_pruned(cubic_sparsity(t, tr.config.schedule, 0.2, 0.9), n)
                assert not (l.mask & ~previous[l.name]).any()  # never regrows
                previous[l.name] = l.mask.clone()
        else:
            assert up is None
        for l in tr.layers:  # pruned weights are exactly zero after every step
            assert not l.weight[~l.mask].any()
    assert seen == [5, 10, 15, 20, 25, 30, 35]
    assert all(abs(s - 0.9) < 0.01 for s in tr.sparsities().values())


@pytest.mark.parametrize("cls", [SET, RigL])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_dst_keeps_count_and_optimizer_state_consistent(cls, opt_name):
    net = mlp()
    if opt_name == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        keys = ["momentum_buffer"]
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, amsgrad=True)
        keys = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    tr = cls(net, opt, sparsity=0.8, distribution="erk", schedule=DST, drop_fraction=0.3)
    counts = {l.name: int(l.mask.sum()) for l in tr.layers}
    total_changed = 0
    for i in range(40):
        x, y = batch(i)
        nn.functional.cross_entropy(net(x), y).backward()
        for l in tr.layers:  # gradients of pruned weights are masked before the optimizer sees them
            assert not l.param.grad[~getattr(l.module, MASK_BUFFER)].any()
        opt.step(); opt.zero_grad()
        before = {l.name: l.mask.clone() for l in tr.layers}
        up = tr.step()
        for l in tr.layers:
            assert int(l.mask.sum()) == counts[l.name]  # exact per-layer count after each update
            assert not l.weight[~l.mask].any()
            state = opt.state[l.param]
            for key in keys:  # inactive entries carry no optimizer state at all times
                assert not l.view(state[key])[~l.mask].any(), key
            if up is not None:
                grown = l.mask & ~before[l.name]
                dropped = before[l.name] & ~l.mask
                assert up.changed[l.name] == (int(dropped.sum()), int(grown.sum()))
                assert int(dropped.sum()) == int(grown.sum())
                assert not l.weight[grown].any()  # grown weights start at zero
                for key in keys:
                    assert not l.view(state[key])[grown | dropped].any(), key
                total_changed += int(grown.sum())
    assert total_changed > 0
    assert tr.num_active() == sum(counts.values())


def test_rigl_grows_exactly_top_gradient_hand_made():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    net = model[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: weights stay as set
    tr = RigL(model, opt, sparsity=0.5, drop_fraction=0.5, drop_fraction_decay="constant",
              schedule={"start_step": 0, "end_step": 10, "update_interval": 1})
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.2, 0.0, 0.9, 0.0]]))
        tr.layers[0].mask.copy_(torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool))
    grad = torch.tensor([[0.0, 0.3, -0.8, 0.1], [-5.0, 0.2, 0.0, 0.7]])
    (net.weight * grad).sum().backward()  # dL/dW = grad
    assert torch.equal(tr.layers[0].grad, grad)  # the dense gradient, stored at the update step
    assert net.weight.grad[0, 2] == 0 and net.weight.grad[1, 3] == 0  # the optimizer sees it masked
    opt.step(); opt.zero_grad()
    up = tr.step()
    # drop |w| 0.1 and 0.2; grow |g| 5.0 (just dropped, comes back with its value) and 0.8
    assert tr.layers[0].mask.int().tolist() == [[1, 0, 1, 0], [1, 0, 1, 0]]
    assert torch.equal(net.weight, torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.2, 0.0, 0.9, 0.0]]))
    assert up.changed == {"0": (1, 1)}


def test_dense_gradient_is_stored_on_update_steps_only():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    tr = RigL(net, opt, sparsity=0.5, schedule={"end_step": 20, "update_interval": 3})
    for i in range(8):
        x, y = batch(i)
        nn.functional.cross_entropy(net(x), y).backward()
        stored = tr.layers[0].grad is not None
        assert stored == ((i + 1) % 3 == 0)
        opt.step(); opt.zero_grad()
        tr.step()
        assert tr.layers[0].grad is None


def test_set_regrowth_is_random_but_seeded():
    def run(seed):
        net = mlp(seed=0)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        tr = SET(net, opt, sparsity=0.8, seed=seed, schedule=DST)
        train(net, opt, tr, 20)
        return [l.mask.clone() for l in tr.layers]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_static_mask_never_changes_and_supports_nm():
    net = mlp(widths=(12, 24, 16, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    tr = StaticSparse(net, opt, pattern="2:4")
    masks = [l.mask.clone() for l in tr.layers]
    assert all(satisfies(m, "2:4") and int(m.sum()) * 2 == m.numel() for m in masks)
    assert all(u is None for u in train(net, opt, tr, 10))
    assert all(torch.equal(m, l.mask) for m, l in zip(masks, tr.layers))


@pytest.mark.parametrize("pattern", ["block4x4", "fanin", "channel"])
def test_structured_patterns_stay_valid(pattern):
    net = mlp(widths=(12, 32, 16, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    tr = RigL(net, opt, sparsity=0.75, pattern=pattern, schedule=DST, drop_fraction_decay="constant")
    counts = [int(l.mask.sum()) for l in tr.layers]
    train(net, opt, tr, 20)
    assert [int(l.mask.sum()) for l in tr.layers] == counts
    assert all(satisfies(l.mask, pattern) for l in tr.layers)


def test_pattern_that_does_not_fit_names_the_layer():
    net = mlp(widths=(12, 24, 10, 4))  # layer "2" has in_features 24 but "4" has in_features 10
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"layer 4: in_features=10 .*2:4"):
        StaticSparse(net, opt, pattern="2:4")
    with pytest.raises(ConfigError, match="layer 0: shape 24x12 is not divisible by block8x8"):
        RigL(net, opt, sparsity=0.5, pattern="block8x8", schedule=DST)


def test_selection_dense_first_last_ignore_and_erk():
    net = mlp(widths=(12, 24, 16, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    tr = StaticSparse(net, opt, sparsity=0.8, dense_first=True, dense_last=True)
    assert [l.name for l in tr.layers] == ["2"]
    tr.remove()
    tr = StaticSparse(net, opt, sparsity=0.8, ignore=["4"], distribution="erk")
    assert [l.name for l in tr.layers] == ["0", "2"]
    sp = tr.sparsities()
    kept = (1 - sp["0"]) * 288 + (1 - sp["2"]) * 384
    assert abs(kept - 0.2 * 672) <= 1.0  # ERK budget, up to rounding to whole weights
    assert sp["2"] > sp["0"]  # the larger layer (more in*out per in+out) is sparser


def test_bad_attachments():
    net = mlp()
    with pytest.raises(ConfigError, match="does not hold the weight of layer 0"):
        StaticSparse(net, torch.optim.SGD(list(net.parameters())[2:], lr=0.1), sparsity=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="either a config or keyword"):
        RigL(net, opt, RigLConfig(sparsity=0.5, schedule=DST), sparsity=0.5)
    with pytest.raises(ConfigError, match="needs a RigLConfig"):
        RigL(net, opt, SETConfig(sparsity=0.5, schedule=DST))
    with pytest.raises(ConfigError, match="unknown key"):
        RigL(net, opt, sparsity=0.5, schedule=DST, drop=0.1)
    with pytest.raises(ConfigError, match="matches no linear layer"):
        StaticSparse(net, opt, sparsity=0.5, targets=["fc9"])
    with pytest.raises(ModelError, match="no linear layers"):
        StaticSparse(nn.Sequential(nn.ReLU()), opt, sparsity=0.5)
    with pytest.raises(ModelError, match="wrap it"):
        StaticSparse(net[0], opt, sparsity=0.5)
    StaticSparse(net, opt, sparsity=0.5)
    with pytest.raises(ConfigError, match="already has a 'weight_mask'"):
        StaticSparse(net, opt, sparsity=0.5)


def test_tied_weights_are_refused():
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    net = nn.Sequential(emb, nn.Linear(8, 8), head)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"layer 2 is shared with \['0.weight', '2.weight'\]"):
        StaticSparse(net, opt, sparsity=0.5)
    assert [l.name for l in StaticSparse(net, opt, sparsity=0.5, dense_last=True).layers] == ["1"]


def test_factored_optimizer_state_is_an_error():
    net = mlp()
    opt = torch.optim.Adafactor(net.parameters(), lr=1e-2)
    tr = SET(net, opt, sparsity=0.5, schedule={"end_step": 20, "update_interval": 2})
    x, y = batch(0)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    tr.step()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    with pytest.raises(ConfigError, match="Adafactor"):
        tr.step()


def test_rigl_without_backward_is_a_clear_error():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    tr = RigL(net, opt, sparsity=0.5, schedule={"end_step": 20, "update_interval": 1})
    with pytest.raises(ConfigError, match="needs the gradient of layer 0"):
        tr.step()


def test_transposed_conv1d_layers():
    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(24, 12), nn.ReLU(), Conv1D(4, 24))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    tr = RigL(net, opt, sparsity=0.5, pattern="fanin", schedule=DST, drop_fraction_decay="constant")
    assert [tuple(l.mask.shape) for l in tr.layers] == [(24, 12), (4, 24)]  # (out, in)
    train(net, opt, tr, 10)
    for l in tr.layers:
        assert l.mask.sum(1).tolist() == [l.mask.shape[1] // 2] * l.mask.shape[0]  # fan-in per output
        assert not l.module.weight.t()[~l.mask].any()
        assert not opt.state[l.param]["exp_avg"].t()[~l.mask].any()


@pytest.mark.parametrize("cls", [RigL, SET, GMP])
def test_resume_is_bit_exact(cls):
    kwargs = dict(sparsity=0.8, schedule=DST)
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    tr = cls(net, opt, **kwargs)
    train(net, opt, tr, 12)
    ckpt = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "trainer": tr.state_dict()})
    train(net, opt, tr, 13, start=12)

    net2 = mlp(seed=7)  # different init: everything must come from the checkpoint
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-2)
    tr2 = cls(net2, opt2, **kwargs)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    tr2.load_state_dict(ckpt["trainer"])
    assert tr2.step_count == 12
    train(net2, opt2, tr2, 13, start=12)
    for (n, a), b in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(a, b), n


def test_resume_with_a_different_recipe_is_an_error():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    state = RigL(net, opt, sparsity=0.8, schedule=DST).state_dict()
    net2 = mlp()
    tr2 = RigL(net2, torch.optim.SGD(net2.parameters(), lr=0.1), sparsity=0.9, schedule=DST)
    with pytest.raises(ConfigError, match=r"different recipe: \['sparsity'\]"):
        tr2.load_state_dict(state)


def test_remove_detaches_and_keeps_zeros():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    tr = StaticSparse(net, opt, sparsity=0.7)
    zeros = [int((l.module.weight == 0).sum()) for l in tr.layers]
    modules = [l.module for l in tr.layers]
    tr.remove()
    assert all(not hasattr(m, MASK_BUFFER) for m in modules)
    assert [int((m.weight == 0).sum()) for m in modules] == zeros
    x, y = batch(0)
    nn.functional.cross_entropy(net(x), y).backward()
    assert (modules[0].weight.grad != 0).float().mean() > 0.5  # no more gradient masking
    with pytest.raises(ConfigError, match="removed"):
        tr.step()
