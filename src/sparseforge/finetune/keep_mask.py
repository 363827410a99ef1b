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

__all__ = ["KeepMask", "pruned_layers", "check_recorded_mask"]


def pruned_layers(model: nn.Module, min_sparsity: float = 0.1) -> list[str]:
    """Names of the linear layers of ``model`` with at least ``min_sparsity`` exact zeros, in model order."""
    modules = dict(model.named_modules())
    out = []
    for name in linear_layers(model):
        w = weight_2d(modules[name])
        if w.numel() and float((w == 0).float().mean()) >= min_sparsity:
            out.append(name)
    return out


def check_recorded_mask(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` plus the layers the model's ``sparsity_config`` lists as pruned, after checking them.

    A layer the checkpoint lists keeps its zeros whatever its sparsity; it must have some zeros, and
    obey the recorded pattern (e.g. 2:4), else its weights do not match the checkpoint's mask.
    """
    from sparseforge.errors import ModelError
    from sparseforge.masks import satisfies

    block = getattr(getattr(model, "config", None), "sparsity_config", None) or {}
    modules = dict(model.named_modules())
    listed = [t.removesuffix(".weight") for t in block.get("targets") or []]
    listed = [n for n in listed if n in modules and n in set(linear_layers(model))]
    pattern = block.get("pattern")
    for name in listed:
        nonzero = weight_2d(modules[name]) != 0  # (out, in)
        if bool(nonzero.all()):
            raise ModelError(f"layer {name} is listed as pruned in the checkpoint's sparsity_config but has no zeros: "
                             "its weights do not match the recorded mask; re-prune the model")
        if pattern is not None and not satisfies(nonzero, pattern):
            raise ModelError(f"layer {name} does not obey the checkpoint's pattern {pattern}: its weights do not "
                             "match the recorded mask; re-prune the model")
    return [n for n in linear_layers(model) if n in set(names) | set(listed)]


class KeepMask(StaticSparse):
    """A static sparse trainer whose mask is the weight's non-zeros at attach time (module doc)."""

    @classmethod
    def attach(cls, model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> "KeepMask":
        """Keep the zeros of the layers ``names`` of ``model`` fixed while ``optimizer`` trains it."""
        return cls(model, optimizer, StaticConfig(sparsity=0.0, targets=list(names)))

    def initial_mask(self, layer) -> torch.Tensor:
        return layer.weight.detach() != 0  # (out, in)
