"""SparseCompute: training on the sparse kernels equals dense-mask training, step for step."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparseforge.train as sft
from sparseforge.errors import ConfigError
from sparseforge.formats import BitmapWeight
from sparseforge.formats.csr import CSRWeight
from sparseforge.nn import SparseLinear
from sparseforge.train.sparse_compute import SparseCompute

SCHEDULE = {"start_step": 0, "end_step": 21, "update_interval": 3}
METHODS = {
    "static": lambda net, opt: sft.StaticSparse(net, opt, sparsity=0.7),
    "set": lambda net, opt: sft.SET(net, opt, sparsity=0.7, schedule=SCHEDULE),
    "rigl": lambda net, opt: sft.RigL(net, opt, sparsity=0.7, schedule=SCHEDULE),
    "gmp": lambda net, opt: sft.GMP(net, opt, sparsity=0.8, schedule=SCHEDULE),
}
OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


def _train(method, optimizer, compute: str | None, steps=13):
    net = _net()
    opt = OPTIMIZERS[optimizer](net.parameters())
    trainer = METHODS[method](net, opt)
    runner = SparseCompute(trainer, format=compute) if compute else trainer
    g = torch.Generator().manual_seed(1)
    updates = []
    for _ in range(steps):
        x = torch.randn(32, 12, generator=g)
        y = torch.randint(0, 3, (32,), generator=g)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        u = runner.step()
        if u is not None:
            updates.append(dict(u.changed))
    weights = [m.to_dense() if isinstance(m, SparseLinear) else m.weight.detach() for m in net if hasattr(m, "in_features")]
    return net, runner, weights, updates


@pytest.mark.parametrize("fmt", ["csr", "bitmap"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sparse_compute_equals_dense_mask_training(method, optimizer, fmt):
    _, _, dense_w, dense_updates = _train(method, optimizer, None)
    net, runner, sparse_w, sparse_updates = _train(method, optimizer, fmt)
    assert sparse_updates == dense_updates and (method == "static" or sparse_updates)
    for a, b in zip(dense_w, sparse_w):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
        assert torch.equal(b != 0, a != 0)
    assert all(isinstance(m, SparseLinear) and m.trainable for m in runner.modules.values())


def test_dst_keeps_the_parameter_count_and_the_optimizer_holds_the_packed_values():
    net, runner, _, _ = _train("rigl", "sgd", "csr")
    counts = {n: m.nnz for n, m in runner.modules.items()}
    assert sum(counts.values()) == runner.num_active()
    held = {id(p) for group in runner.trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(m.csr_values) in held for m in runner.modules.values())
    assert not any(p.numel() == 24 * 24 for p in runner.trainer.optimizer.param_groups[0]["params"])  # no dense weights
    fresh = _net()
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    start = SparseCompute(sft.RigL(fresh, opt, sparsity=0.7, schedule=SCHEDULE)).num_active()
    assert start == runner.num_active()


@pytest.mark.parametrize("cls", [CSRWeight, BitmapWeight])
def test_values_are_the_kept_entries_in_row_major_order(cls):
    # the optimizer-state carry-over relies on it
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 19, generator=g)
    mask = torch.rand(7, 19, generator=g) < 0.4
    mask[2] = False
    assert torch.equal(cls.from_dense(w * mask, mask).values, w[mask])


def test_sparse_compute_refusals():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="keeps a dense weight"):
        SparseCompute(sft.STE(net, opt, pattern="2:4"))
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = sft.StaticSparse(net, opt, sparsity=0.5)
    with pytest.raises(ConfigError, match="supports formats"):
        SparseCompute(trainer, format="nm")
    trainer.step()
    with pytest.raises(ConfigError, match="right after creating it"):
        SparseCompute(trainer)


def test_module_doctest():
    import doctest

    import sparseforge.train.sparse_compute as mod

    assert doctest.testmod(mod).failed == 0
