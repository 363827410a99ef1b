"""S-STE (Hu et al. 2024): soft thresholding against hand-computed groups, the fixed scale, continuity."""

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparseforge.train as sft
from sparseforge.errors import ConfigError, NumericalError
from sparseforge.masks import mask_from_scores, satisfies
from sparseforge.train.sste import soft_threshold, sste_scale
from train_helpers import run_benchmark


def _s(row, pattern):
    w = torch.tensor([row])
    m = int(pattern.split(":")[1])
    return soft_threshold(w, mask_from_scores(w.abs(), pattern), m)[0].tolist()


def test_soft_threshold_on_hand_computed_groups():
    # 2:4: t = 3rd largest |w| = 0.5; the two kept move toward 0 by 0.5
    assert _s([0.5, -2.0, 0.1, 3.0], "2:4") == pytest.approx([0.0, -1.5, 0.0, 2.5])
    # 1:4: t = 2nd largest = 2
    assert _s([0.5, -2.0, 0.1, 3.0], "1:4") == pytest.approx([0.0, 0.0, 0.0, 1.0])
    # a tie at the top: t = 1
    assert _s([4.0, -4.0, 1.0, 1.0], "2:4") == pytest.approx([3.0, -3.0, 0.0, 0.0])
    # a tie at the threshold: the kept 1 (lower index) becomes 0; still at most N nonzeros
    assert _s([3.0, 1.0, -1.0, 0.2], "2:4") == pytest.approx([2.0, 0.0, 0.0, 0.0])
    # two groups in a row, 2:8: t = 3rd largest of each 8
    row = [1.0, -5.0, 2.0, 0.0, 0.5, 4.0, -3.0, 0.1]
    assert _s(row, "2:8") == pytest.approx([0.0, -2.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])


def test_scale_is_the_least_squares_beta_of_the_paper():
    w = torch.tensor([[0.5, -2.0, 0.1, 3.0]])
    mask = mask_from_scores(w.abs(), "2:4")
    # S = [0, -1.5, 0, 2.5]: <W, S> = 3 + 7.5, <S, S> = 2.25 + 6.25
    assert sste_scale(w, mask, 4) == pytest.approx(10.5 / 8.5)
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    mask = mask_from_scores(w.abs(), "2:4")
    s = soft_threshold(w, mask, 4)
    beta = sste_scale(w, mask, 4)
    # it minimises ||W - beta S||^2: the residual is orthogonal to S
    assert float(((w - beta * s) * s).sum()) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(NumericalError, match="all zero"):
        sste_scale(torch.ones(2, 4), mask_from_scores(torch.ones(2, 4), "2:4"), 4)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["2:4", "1:4", "2:8"]), st.floats(1e-4, 1e-1))
def test_soft_threshold_is_continuous_and_nm(seed, pattern, eps):
    """|S(W1) - S(W2)|_max <= 2 |W1 - W2|_max, masks flipping or not (the hard threshold jumps)."""
    g = torch.Generator().manual_seed(seed)
    m = int(pattern.split(":")[1])
    n = int(pattern.split(":")[0])
    w1 = torch.randn(4, 2 * m, generator=g, dtype=torch.float64)
    w2 = w1 + eps * (2 * torch.rand(w1.shape, generator=g, dtype=torch.float64) - 1)
    s1 = soft_threshold(w1, mask_from_scores(w1.abs(), pattern), m)
    s2 = soft_threshold(w2, mask_from_scores(w2.abs(), pattern), m)
    assert float((s1 - s2).abs().max()) <= 2 * float((w1 - w2).abs().max()) + 1e-12
    assert ((s1 != 0).reshape(-1, m).sum(1) <= n).all()


def _net(seed=0, widths=(8, 16, 4)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(widths[0], widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2]))


def test_forward_is_scaled_soft_threshold_and_backward_is_straight_through():
    net = _net(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = sft.SSTE(net, opt, pattern="2:4")
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    for layer in trainer.layers:
        w = layer.param.detach()
        beta = trainer.scales()[layer.name]
        assert beta == pytest.approx(sste_scale(w, mask_from_scores(w.abs(), "2:4"), 4), rel=1e-6)
        expected = beta * soft_threshold(w, layer.mask, 4)
        torch.testing.assert_close(layer.module.weight, expected)
    # straight-through: the dense weight's gradient is dL/dW~ at every entry, pruned ones included
    net(x).square().mean().backward()
    w0 = net[0].weight.detach().requires_grad_()  # the forward's weight of layer 0, as a leaf
    h = torch.relu(x @ w0.t() + net[0].bias.detach())
    (h @ net[2].weight.detach().t() + net[2].bias.detach()).square().mean().backward()
    torch.testing.assert_close(trainer.layers[0].param.grad, w0.grad)
    assert (trainer.layers[0].param.grad[~trainer.layers[0].mask] != 0).any()


def test_scale_stays_fixed_and_finalize_bakes_beta_times_s():
    net = _net(3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    trainer = sft.SSTE(net, opt, pattern="1:4")
    first = trainer.scales()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        net(torch.randn(4, 8, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        trainer.step()
    assert trainer.scales() == first  # computed once, from the initial weights
    assert len(trainer.flip_rate) == 5
    expected = [first[l.name] * soft_threshold(l.weight, mask_from_scores(l.weight.abs(), "1:4"), 4)
                for l in trainer.layers]
    trainer.finalize()
    for module, e in zip((net[0], net[2]), expected):
        assert isinstance(module.weight, nn.Parameter)
        assert satisfies(module.weight != 0, "1:4")
        torch.testing.assert_close(module.weight.detach(), e)


def test_config_recipe_and_refusals():
    cfg = sft.SSTEConfig(pattern="2:4")
    assert sft.parse_train_recipe(sft.dump_train_recipe(cfg)) == cfg
    net = _net(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert isinstance(sft.from_config(net, opt, cfg), sft.SSTE)
    with pytest.raises(ConfigError, match="already continuous"):
        sft.SSTEConfig(flow_decay="exp", flow_decay_coef=0.01)
    with pytest.raises(ConfigError, match="transposable"):
        sft.SSTEConfig(transposable=True)
    with pytest.raises(ConfigError, match="not N:M"):
        sft.SSTEConfig(pattern="unstructured", sparsity=0.5)


def test_resume_is_bit_exact():
    def run(steps, resume_at=None):
        net = _net(7)
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        trainer = sft.SSTE(net, opt, pattern="2:4")
        g = torch.Generator().manual_seed(0)
        for i in range(steps):
            x = torch.randn(4, 8, generator=g)
            if i == resume_at:
                saved = (net.state_dict(), opt.state_dict(), trainer.state_dict())
                net = _net(99)  # other initial weights: another scale until the state dict is loaded
                opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
                trainer = sft.SSTE(net, opt, pattern="2:4")
                net.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
                trainer.load_state_dict(saved[2])
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            trainer.step()
        return net

    a, b = run(6), run(6, resume_at=3)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


@pytest.mark.slow
def test_lm_benchmark_smoke(tmp_path):
    importlib.import_module("transformers")
    import json

    out = tmp_path / "lm.json"
    assert run_benchmark("lm_quality", ["--steps", "8", "--interval", "2", "--seeds", "1", "--eval-windows", "2",
                                        "--methods", "dense", "rigl90", "sste", "ste14", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {r["method"] for r in data["runs"]} == {"dense", "rigl90", "sste", "ste14"}
    rigl = next(r for r in data["runs"] if r["method"] == "rigl90")
    assert rigl["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert all(math.isfinite(r["heldout_ppl"]) for r in data["runs"])
