import pytest
import torch
from torch import nn

from sparseforge.errors import ConfigError
from sparseforge.masks import mask_from_scores
from sparseforge.train.iterative import average_models, imp, sparse_model_soup, swamp


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def sgd_train(steps=10):
    def train_fn(model, r, p):
        g = torch.Generator().manual_seed(1000 * r + p)  # the particle sets the batch order
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        for _ in range(steps):
            x = torch.randn(32, 8, generator=g)
            nn.functional.cross_entropy(model(x), (x[:, :4].argmax(1))).backward()
            opt.step(); opt.zero_grad()
    return train_fn


def effective(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_imp_schedule_rewinding_and_nested_masks():
    net = mlp()
    start = effective(net)
    seen = []

    def train_fn(model, r, p):
        seen.append((r, p, effective(model)))  # the weights this round starts from
        sgd_train()(model, r, p)

    res = imp(net, train_fn, rounds=3, sparsity=0.875)
    assert [r for r, _, _ in seen] == [0, 1, 2, 3] and res.trainings == 4
    # the same fraction (1/2) of the remaining weights goes each round: 50%, 75%, 87.5%
    assert res.sparsities == pytest.approx([0.5, 0.75, 0.875])
    previous = None
    for r, _, weights in seen[1:]:
        for name, w in weights.items():
            mask = w != 0
            assert torch.equal(w, start[name] * mask)  # rewound to the call's weights, masked
        if previous is not None:
            assert all(not (weights[n] != 0)[~(previous[n] != 0)].any() for n in weights)  # nested
        previous = weights
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            assert float((m.weight == 0).float().mean()) == 0.875 and torch.equal(m.weight != 0, res.masks[name])
            assert not hasattr(m, "parametrizations")  # plain weights at the end


def test_swamp_average_is_the_mean_of_particles_at_the_shared_mask():
    net = mlp(1)
    particles = []

    def train_fn(model, r, p):
        sgd_train()(model, r, p)
        particles.append((r, p, effective(model)))

    res = swamp(net, train_fn, rounds=2, sparsity=0.75, particles=3)
    assert res.trainings == 9 and [(r, p) for r, p, _ in particles] == [(r, p) for r in range(3) for p in range(3)]
    last = [w for r, _, w in particles if r == 2]
    for name, w in effective(net).items():
        mask = res.masks[name]
        assert all(not x[name][~mask].any() for x in last)  # every particle trained at the shared mask
        assert torch.equal(w, torch.stack([x[name] for x in last]).mean(0))  # averaged = mean of particles
        assert not w[~mask].any()
    # the particles differ (different batch orders), so averaging is not a no-op
    assert not torch.equal(last[0]["0"], last[1]["0"])


def test_swamp_prunes_the_average():
    net = mlp(2)

    def train_fn(model, r, p):
        with torch.no_grad():  # particle p adds a fixed pattern: the average is known in closed form
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.parametrizations.weight.original.add_(torch.linspace(-1, 1, m.weight.numel()).reshape(m.weight.shape) * (p - 0.5) * 2)

    before = effective(net)
    res = swamp(net, train_fn, rounds=1, sparsity=0.5, particles=2)
    # particles add +x and -x: the average is the start, so the mask is the magnitude mask of the start
    for name, w in before.items():
        assert torch.equal(res.masks[name], mask_from_scores(w.abs(), "unstructured", 0.5))


def test_sparse_model_soup_no_rewind_prune_first():
    net = mlp(3)
    sgd_train(30)(net, 0, 0)  # "pretrained"
    starts = []

    def train_fn(model, r, p):
        starts.append((r, p, effective(model)))
        sgd_train()(model, r, p)

    res = sparse_model_soup(net, train_fn, rounds=2, sparsity=0.75, particles=2)
    assert [(r, p) for r, p, _ in starts] == [(1, 0), (1, 1), (2, 0), (2, 1)] and res.trainings == 4
    # both particles of a phase start from the same model; phase 2 starts from phase 1's average, pruned
    for name in starts[0][2]:
        assert torch.equal(starts[0][2][name], starts[1][2][name])
        assert torch.equal(starts[2][2][name], starts[3][2][name])
        assert float((starts[2][2][name] == 0).float().mean()) == pytest.approx(0.75)
    assert res.sparsities == pytest.approx([0.5, 0.75])


def test_average_models_formula():
    a, b, into = mlp(4), mlp(5), mlp(6)
    average_models([a, b], into)
    for pa, pb, pi in zip(a.parameters(), b.parameters(), into.parameters()):
        assert torch.allclose(pi, (pa + pb) / 2)


def test_bad_input():
    net = mlp()
    with pytest.raises(ConfigError, match="rounds"):
        imp(net, sgd_train(), rounds=0, sparsity=0.5)
    with pytest.raises(ConfigError, match="particles"):
        swamp(net, sgd_train(), rounds=1, sparsity=0.5, particles=0)
    with pytest.raises(ConfigError, match="N:M"):
        imp(net, sgd_train(), rounds=2, sparsity=0.5, pattern="2:4")
    with pytest.raises(ConfigError, match="train_fn"):
        imp(net, None, rounds=2, sparsity=0.5)
    assert not hasattr(net[0], "parametrizations")
