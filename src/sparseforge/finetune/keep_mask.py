"""Keep a pruned model's mask exactly while it trains: the zeros it has now stay zero.

:class:`KeepMask` is a static sparse trainer (:class:`sparseforge.train.StaticSparse`) whose mask
is the weight's own non-zeros at attach time, so the whole :mod:`sparseforge.train` machinery
applies: gradients of pruned weights are masked before the optimizer sees them (Adam moments and
momentum at pruned positions stay exactly zero), weights are re-masked after every optimizer step
(the reference SquareHead code's ``MaskPrunedWeights``), and ``state_dict`` / ``load_state_dict``
give a bit-exact resume. An N:M layer stays N:M because no zero ever becomes non-zero.

:func:`pruned_layers` finds the layers to keep: linear layers with at least ``min_sparsity``
exact zeros (0.1 in the reference code).

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with torch.no_grad():
    ...     net[0].weight[:, :4] = 0
    >>> opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    >>> keeper = KeepMask.attach(net, opt, pruned_layers(net))
    >>> net(torch.randn(4, 8)).sum().backward(); opt.step(); keeper.step() is None
    True
    >>> bool((net[0].weight[:, :4] == 0).all())
    True
"""

from __future__ import annotations

import torch
from torch import nn

from sparseforge.layers import linear_layers, weight_2d
from sparseforge.train import StaticSparse
from sparseforge.train.config import StaticConfig

__all__ = ["KeepMask", "pruned_layers"]


def pruned_layers(model: nn.Module, min_sparsity: float = 0.1) -> list[str]:
    """Names of the linear layers of ``model`` with at least ``min_sparsity`` exact zeros, in model order."""
    modules = dict(model.named_modules())
    out = []
    for name in linear_layers(model):
        w = weight_2d(modules[name])
        if w.numel() and float((w == 0).float().mean()) >= min_sparsity:
            out.append(name)
    return out


class KeepMask(StaticSparse):
    """A static sparse trainer whose mask is the weight's non-zeros at attach time (module doc)."""

    @classmethod
    def attach(cls, model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> "KeepMask":
        """Keep the zeros of the layers ``names`` of ``model`` fixed while ``optimizer`` trains it."""
        return cls(model, optimizer, StaticConfig(sparsity=0.0, targets=list(names)))

    def initial_mask(self, layer) -> torch.Tensor:
        return layer.weight.detach() != 0  # (out, in)
