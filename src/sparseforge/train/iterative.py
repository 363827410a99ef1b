"""Iterative magnitude pruning with weight rewinding, SWAMP and Sparse Model Soups: a small driver.

You bring the training: ``train_fn(model, round, particle)`` trains ``model`` in place (build the
optimizer inside it, over ``model.parameters()``). The driver keeps the mask: every selected
linear layer's weight is parametrized as ``W * mask`` while ``train_fn`` runs, so pruned weights
have no effect and get no gradient whatever optimizer you use; at the end the zeros are written
into plain weights and the parametrizations removed.

* :func:`imp`, **IMP with weight rewinding** (Frankle & Carbin 2019; rewinding to an early
  iterate: Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis").
  The weights at the call are the rewind point (train ``k`` steps before calling to rewind to
  iteration ``k``). Round ``r = 0 .. rounds``: train; if ``r < rounds`` prune the smallest ``|w|``
  among the active weights to ``s_{r+1} = 1 - (1 - s)^((r+1)/rounds)`` (the same fraction of
  the remaining weights every round) and rewind the kept weights. ``rounds + 1`` trainings.
* :func:`swamp`, **SWAMP** (Choi et al. 2023): IMP where every round trains ``particles`` copies
  of the same rewound ticket (use ``particle`` to vary the batch order), averages their weights,
  and prunes the *average* to get the next mask. The final model is the last round's average.
  (The paper also runs stochastic weight averaging inside each particle's training: that is
  ``train_fn``'s business here.)
* :func:`sparse_model_soup`, **Sparse Model Soups** (Zimmer et al. 2023): starting from a
  trained model, each of ``rounds`` phases prunes the current model, retrains ``particles``
  copies (vary the seed, batch order or weight decay with ``particle``) and averages them;
  the next phase starts from that average. No rewinding (prune-retrain).

Averaging: every floating-point parameter and buffer is the mean over particles; the particles
share one mask, so the average has the same zeros (and ``averaged = mean(particles)`` holds at
every active weight). Masks are selected by :func:`sparseforge.masks.mask_from_scores` (through
:func:`sparseforge.train.updates.prune_mask`), layer-wise with the ``distribution`` of the
training configs (uniform, ER, ERK).

Example:
    >>> import torch, torch.nn as nn
    >>> from sparseforge.train.iterative import swamp
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> def train_fn(model, round, particle):
    ...     g = torch.Generator().manual_seed(100 * round + particle)   # particle: batch order
    ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ...     for _ in range(5):
    ...         x = torch.randn(16, 8, generator=g)
    ...         nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
    ...         opt.step(); opt.zero_grad()
    >>> result = swamp(net, train_fn, rounds=2, sparsity=0.75, particles=2)
    >>> [round(s, 4) for s in result.sparsities]        # after each pruning round
    [0.5, 0.75]
    >>> float((net[0].weight == 0).float().mean())
    0.75
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseforge.errors import ConfigError, ModelError
from sparseforge.layers import is_linear, select_targets, weight_2d
from sparseforge.patterns import NM, check_fits, parse
from sparseforge.train.density import layer_sparsities
from sparseforge.train.updates import prune_mask, selection_pattern

__all__ = ["imp", "swamp", "sparse_model_soup", "iterative_prune", "average_models", "IterativeResult"]

TrainFn = Callable[[nn.Module, int, int], None]


@dataclass
class IterativeResult:
    """What the driver did: final ``(out, in)`` masks, the sparsity after each pruning, trainings run."""

    masks: dict[str, torch.Tensor]
    sparsities: list[float] = field(default_factory=list)  # mean sparsity over the layers after each prune
    trainings: int = 0


class _Mask(nn.Module):
    """Parametrization ``W -> W * mask`` (mask in the weight's layout, not saved in the state dict)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def average_models(models: Sequence[nn.Module], into: nn.Module) -> None:
    """Write the mean of ``models``' floating-point state (parameters and buffers) into ``into``."""
    states = [m.state_dict() for m in models]
    merged = {}
    for key, value in states[0].items():
        merged[key] = torch.stack([s[key] for s in states]).mean(0) if value.is_floating_point() else value
    into.load_state_dict(merged)


def _layout(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    return mask if isinstance(module, nn.Linear) else mask.t().contiguous()  # Conv1D stores (in, out)


def iterative_prune(model: nn.Module, train_fn: TrainFn, rounds: int, sparsity: float, *, particles: int = 1,
                    rewind: bool = True, train_first: bool = True, pattern: str = "unstructured",
                    distribution: str = "uniform", targets: list[str] | None = None,
                    ignore: Sequence[str] = ()) -> IterativeResult:
    """The loop behind :func:`imp`, :func:`swamp` and :func:`sparse_model_soup` (see the module doc)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise ConfigError(f"particles must be an integer >= 1, got {particles!r}")
    if not callable(train_fn):
        raise ConfigError("train_fn must be a function train_fn(model, round, particle) that trains model in place")
    pat = parse(pattern)
    if isinstance(pat, NM):
        raise ConfigError(f"iterative pruning ramps the sparsity; N:M pattern {pat} fixes it (use 'unstructured')")
    selection_pattern(pat, "iterative magnitude pruning")
    if is_linear(model):
        raise ModelError("the model is a single linear layer; wrap it in a module, e.g. nn.Sequential(layer)")
    names = select_targets(model, targets if targets is not None else ["*"], list(ignore), None)
    modules = dict(model.named_modules())
    shapes = {}
    for name in names:
        if parametrize.is_parametrized(modules[name], "weight"):
            raise ConfigError(f"layer {name} already has a weight parametrization; remove it first")
        shapes[name] = tuple(weight_2d(modules[name]).shape)
        check_fits(pat, shapes[name], layer=name)
    final = layer_sparsities(shapes, sparsity, distribution)
    masks = {n: torch.ones(shapes[n], dtype=torch.bool, device=modules[n].weight.device) for n in names}
    for n in names:
        parametrize.register_parametrization(modules[n], "weight", _Mask(_layout(modules[n], masks[n])))
    start = copy.deepcopy(model.state_dict())  # rewind point (masks are not part of it)
    result = IterativeResult(masks)
    try:
        for r in range(rounds + 1):
            if r > 0 or train_first:
                _train_round(model, train_fn, r, particles)
                result.trainings += particles
            if r == rounds:
                break
            with torch.no_grad():
                for n in names:
                    module = modules[n]
                    w = weight_2d(module).abs()  # (out, in): W * mask
                    target = 1.0 - (1.0 - final[n]) ** ((r + 1) / rounds)
                    masks[n] = prune_mask(masks[n], w, pat, target)
                    module.parametrizations.weight[0].mask.copy_(_layout(module, masks[n]))
                if rewind:
                    model.load_state_dict(start)
            total = sum(m.numel() for m in masks.values())
            result.sparsities.append(sum(int((~m).sum()) for m in masks.values()) / total)
    finally:
        for n in names:
            parametrize.remove_parametrizations(modules[n], "weight", leave_parametrized=True)
    return result


def _train_round(model: nn.Module, train_fn: TrainFn, r: int, particles: int) -> None:
    if particles == 1:
        train_fn(model, r, 0)
        return
    copies = []
    for p in range(particles):
        particle = copy.deepcopy(model)
        train_fn(particle, r, p)
        copies.append(particle)
    average_models(copies, model)


def imp(model: nn.Module, train_fn: TrainFn, rounds: int, sparsity: float, **options) -> IterativeResult:
    """IMP with weight rewinding to the weights at the call (see the module doc)."""
    return iterative_prune(model, train_fn, rounds, sparsity, particles=1, rewind=True, train_first=True, **options)


def swamp(model: nn.Module, train_fn: TrainFn, rounds: int, sparsity: float, particles: int = 4,
          **options) -> IterativeResult:
    """SWAMP: IMP whose every round trains ``particles`` copies of the ticket and prunes their average."""
    return iterative_prune(model, train_fn, rounds, sparsity, particles=particles, rewind=True, train_first=True,
                           **options)


def sparse_model_soup(model: nn.Module, train_fn: TrainFn, rounds: int, sparsity: float, particles: int = 3,
                      **options) -> IterativeResult:
    """Sparse Model Soups: prune the (trained) model, retrain ``particles`` copies, average; repeat."""
    return iterative_prune(model, train_fn, rounds, sparsity, particles=particles, rewind=False, train_first=False,
                           **options)
