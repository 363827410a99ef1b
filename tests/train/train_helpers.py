"""Shared helpers of the sparse-training tests: tiny nets, deterministic batches, a resume check,
a transformers-style Conv1D layer and a runner for the benchmark scripts."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
from torch import nn

DST = {"start_step": 0, "end_step": 40, "update_interval": 5}


def mlp(seed: int = 0, widths=(12, 24, 16, 4)) -> nn.Sequential:
    """Linear-ReLU stack (no ReLU after the last layer), seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batch(i: int, d_in: int = 12, d_out: int = 4):
    """Batch number i: 16 inputs (16, d_in) and class labels (16,), the same on every call."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, d_in, generator=g), torch.randint(0, d_out, (16,), generator=g)


def train_steps(net, opt, trainer, start: int, stop: int) -> None:
    """Cross-entropy steps on batches start..stop-1, trainer.step() after each optimizer step."""
    for i in range(start, stop):
        x, y = batch(i, net[0].in_features, net[-1].out_features)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        trainer.step()


def assert_resume_bit_exact(fresh, split: int, stop: int = 30) -> None:
    """Training 0..stop in one go equals training 0..split, saving, reloading into fresh objects and
    training split..stop. ``fresh()`` returns a new (net, optimizer, trainer)."""
    net, opt, tr = fresh()
    train_steps(net, opt, tr, 0, stop)
    ref = copy.deepcopy(net.state_dict())
    net, opt, tr = fresh()
    train_steps(net, opt, tr, 0, split)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict(), tr.state_dict()))
    net, opt, tr = fresh()
    net.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    tr.load_state_dict(saved[2])
    train_steps(net, opt, tr, split, stop)
    assert all(torch.equal(ref[k], v) for k, v in net.state_dict().items())


class Conv1D(nn.Module):
    """transformers' Conv1D layout: weight (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def run_benchmark(name: str, argv: list[str]) -> int:
    """Import benchmarks/<name>.py and run its main(argv); torch's thread count (which the scripts set)
    is restored afterwards."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"bench_{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = torch.get_num_threads()
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(before)
