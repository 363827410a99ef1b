"""N:M training (STE, SR-STE): masks, straight-through gradients, the sparse-refined term, flip rate."""

import importlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparseforge.train as sft
from sparseforge.errors import ConfigError
from sparseforge.masks import satisfies
from train_helpers import Conv1D, run_benchmark


def _net(seed=0, widths=(8, 16, 4)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(widths[0], widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2]))


def _group_topn(w, n, m):
    """Reference N:M mask written out directly: the n largest |w| of every m consecutive inputs."""
    out = torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], m):
            idx = sorted(range(m), key=lambda i: (-abs(float(w[r, g + i])), i))[:n]
            for i in idx:
                out[r, g + i] = True
    return out


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), pattern=st.sampled_from(["2:4", "1:4", "2:8"]), srste=st.booleans())
def test_masks_are_always_valid_nm_and_follow_abs_w(seed, pattern, srste):
    net = _net(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    trainer = (sft.SRSTE if srste else sft.STE)(net, opt, pattern=pattern)
    n, m = map(int, pattern.split(":"))
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        net(torch.randn(5, 8, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        trainer.step()
        for layer in trainer.layers:
            assert satisfies(layer.mask, pattern)
            assert int(layer.mask.sum()) == layer.mask.numel() * n // m  # exactly N per group
            assert torch.equal(layer.mask, _group_topn(layer.weight, n, m))
            assert torch.equal(layer.module.weight, layer.weight * layer.mask)  # the forward's weight


def test_ste_gradient_is_the_masked_forward_gradient_passed_straight_through():
    net = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Identity())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.5, -2.0, 0.1, 3.0]]))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    trainer = sft.STE(net, opt, pattern="2:4")
    assert trainer.layers[0].mask.tolist() == [[False, True, False, True]]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (net(x).sum() ** 2).backward()
    # by hand: y = -2*2 + 3*4 = 8, L = y^2, dL/dW~ = 2 y x = 16 x, for every entry (pruned ones too)
    assert trainer.layers[0].param.grad.tolist() == [[16.0, 32.0, 48.0, 64.0]]
    # and equal to autograd's dense gradient of the masked forward w.r.t. the masked weight
    wm = (net[0].parametrizations.weight.original * trainer.layers[0].mask).detach().requires_grad_()
    ((x @ wm.t()).sum() ** 2).backward()
    assert torch.equal(wm.grad, trainer.layers[0].param.grad)


def test_srste_adds_exactly_lambda_times_pruned_weights():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    grads = {}
    for cls, kw in ((sft.STE, {}), (sft.SRSTE, {"decay": 0.25})):
        net = _net(3)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        trainer = cls(net, opt, pattern="2:4", **kw)
        net(x).square().mean().backward()
        grads[cls] = [(l.param.grad.clone(), l.param.detach().clone(), l.mask.clone()) for l in trainer.layers]
    for (g_ste, w, mask), (g_sr, w2, mask2) in zip(grads[sft.STE], grads[sft.SRSTE]):
        assert torch.equal(w, w2) and torch.equal(mask, mask2)
        torch.testing.assert_close(g_sr - g_ste, 0.25 * (~mask) * w, rtol=0, atol=1e-7)
        assert torch.equal(g_sr[mask], g_ste[mask])  # kept weights untouched
    assert sft.SRSTEConfig().decay == 2e-4  # the paper's lambda_W


def test_pruned_weights_keep_training_and_can_come_back():
    net = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Identity())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.9, 0.1, 0.2]]))
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    trainer = sft.STE(net, opt, pattern="2:4")
    x = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    (-net(x).sum()).backward()  # only the pruned entry 2 has a gradient: it grows by 1
    opt.step()
    opt.zero_grad()
    trainer.step()
    assert net[0].parametrizations.weight.original[0, 2].item() == pytest.approx(1.1)
    assert trainer.layers[0].mask.tolist() == [[True, False, True, False]]
    assert trainer.flip_rate[-1].total == pytest.approx(2 / 4)


def test_flip_rate_exact_on_a_hand_made_example():
    net = _net(0, widths=(4, 4, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = sft.STE(net, opt, pattern="2:4")
    first, second = trainer.layers
    with torch.no_grad():  # set the dense weights directly, as an optimizer step would
        first.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0],
                                         [5.0, 6.0, 7.0, 8.0], [8.0, 7.0, 6.0, 5.0]]))
        second.weight.copy_(torch.tensor([[4.0, 3.0, 1.0, 2.0]]))
    trainer.step()
    with torch.no_grad():  # layer 0: row 0 keeps {0, 3} instead of {0, 1} (2 flips); rest unchanged
        first.weight[0] = torch.tensor([4.0, 1.0, 2.0, 3.0])
        second.weight.neg_()  # |w| unchanged: no flips
    update = trainer.step()
    rate = trainer.flip_rate[-1]
    assert rate.step == 2
    assert rate.layers == {"0": 2 / 16, "2": 0.0}
    assert rate.total == 2 / 20
    assert update.changed == {"0": (1, 1), "2": (0, 0)}
    assert update.value == rate.total
    assert len(trainer.flip_rate) == 2


def test_finalize_bakes_a_valid_nm_weight():
    net = _net(5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    trainer = sft.SRSTE(net, opt, pattern="1:4")
    for _ in range(3):
        net(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        trainer.step()
    dense = [l.weight.clone() for l in trainer.layers]
    trainer.finalize()
    for w_dense, module in zip(dense, (net[0], net[2])):
        assert isinstance(module.weight, nn.Parameter)  # plain weight again
        assert satisfies(module.weight != 0, "1:4")
        assert torch.equal(module.weight.detach(), w_dense * _group_topn(w_dense, 1, 4))
    assert "parametrizations" not in dict(net.named_modules()).get("0").__dict__["_modules"]
    with pytest.raises(ConfigError, match="finalized"):
        trainer.step()


@pytest.mark.parametrize("cls", [sft.STE, sft.SRSTE])
def test_bad_input(cls):
    net = _net(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="not N:M"):
        cls(net, opt, pattern="unstructured", sparsity=0.5)
    with pytest.raises(ConfigError, match="not N:M"):
        cls(net, opt, pattern="block2x2", sparsity=0.5)
    odd = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    with pytest.raises(ConfigError, match=r"layer 2: in_features=6 is not divisible by M=4"):
        cls(odd, torch.optim.SGD(odd.parameters(), lr=0.1), pattern="2:4")
    with pytest.raises(ConfigError, match="fixes the sparsity"):
        cls(net, opt, pattern="2:4", sparsity=0.9)
    cls(net, opt, pattern="2:4")
    with pytest.raises(ConfigError, match="layer 0 already has a parametrized weight"):  # a second trainer
        cls(net, opt, pattern="2:4")


def test_srste_decay_validated_and_recipe_round_trip():
    with pytest.raises(ConfigError, match="decay"):
        sft.SRSTEConfig(decay=-1.0)
    cfg = sft.SRSTEConfig(pattern="1:4", decay=1e-3)
    assert sft.parse_train_recipe(sft.dump_train_recipe(cfg)) == cfg
    net = _net(0)
    trainer = sft.from_config(net, torch.optim.SGD(net.parameters(), lr=0.1), cfg)
    assert isinstance(trainer, sft.SRSTE) and trainer.decay == 1e-3


def test_resume_is_bit_exact():
    def run(steps, resume_at=None):
        net = _net(7)
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        trainer = sft.SRSTE(net, opt, pattern="2:4", decay=0.01)
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(4, 8, generator=g) for _ in range(steps)]
        for i, x in enumerate(xs):
            if i == resume_at:
                saved = (net.state_dict(), opt.state_dict(), trainer.state_dict())
                net = _net(99)
                opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
                trainer = sft.SRSTE(net, opt, pattern="2:4", decay=0.01)
                net.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
                trainer.load_state_dict(saved[2])
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            trainer.step()
        return net, trainer

    a, ta = run(6)
    b, tb = run(6, resume_at=3)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    assert [f.total for f in ta.flip_rate] == [f.total for f in tb.flip_rate]


def test_transposed_conv1d_layers_group_along_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(12, 8), nn.ReLU(), Conv1D(4, 12))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = sft.SRSTE(net, opt, pattern="2:4")
    for _ in range(3):
        net(torch.randn(5, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        trainer.step()
    for layer in trainer.layers:
        w = layer.param.detach().t()  # (out, in)
        assert torch.equal(layer.mask, _group_topn(w, 2, 4))  # groups of 4 consecutive *inputs*
    trainer.finalize()
    for module in (net[0], net[2]):
        assert satisfies(module.weight.detach().t() != 0, "2:4")


def test_benchmark_nm_smoke(tmp_path):
    importlib.import_module("sklearn")
    out = tmp_path / "q.json"
    assert run_benchmark("dst_quality", ["--nm", "--quick", "--seeds", "1", "--steps", "20", "--out", str(out)]) == 0
    import json

    nm = json.loads(out.read_text())["nm"]
    assert {r["method"] for r in nm["runs"]} == {"dense", "ste", "srste", "sste", "ste+mdgf", "ste+sdgf"}
    for r in nm["runs"]:
        if r["method"] != "dense":
            assert r["zero_fraction"] == pytest.approx(1 - int(r["pattern"][0]) / 4)
            assert len(r["flip_rate_by_tenth"]) == 10
