"""N:M training from dense weights: STE and SR-STE (Zhou et al. 2021), with a mask flip-rate monitor.

Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch" (ICLR 2021):

* **STE**: the forward pass uses ``W * m``, ``m`` the N:M mask of the largest ``|W|`` in every group
  of M consecutive inputs, recomputed every step; the backward pass hands ``dL/d(W * m)`` straight
  through to the *dense* ``W``. Pruned weights keep training and can come back (unlike RigL / GMP).
* **SR-STE**: the same, plus the sparse-refined term on the gradient:
  ``g = dL/d(W * m) + lambda_W * (~m) * W`` (a decay of the pruned weights only; ``lambda_W = 2e-4``).
* **Progressive gradient flow** (option ``flow_decay``; Bambhaniya et al. 2024, "Progressive Gradient
  Flow for Robust N:M Sparsity Training in Transformers", MDGF): the forward uses
  ``W * (m + beta_t * (1 - m))``, the pruned weights' share ``beta_t`` decaying from 1 (dense) to 0
  (N:M): ``beta_t = max(0, 1 - k (t - t0))`` (linear) or ``exp(-k (t - t0))`` (exp), ``beta_t = 1``
  before ``t0 = flow_decay_start``; the backward stays straight-through, as in the authors' code.
  SDGF, the paper's other family (option ``structure_decay``): the masks are dense before
  ``structure_decay_start``, then step through the patterns of :func:`structure_schedule`
  (``stepwise``: 7:8 -> 4:8 -> 2:8 -> 1:8; ``geometric``: 8:64 -> 4:32 -> 2:16 -> 1:8), each for an
  equal share of the steps up to ``structure_decay_end``, and are the target pattern from then on.
* **Transposable masks** (option ``transposable``): masks N:M along inputs and outputs
  (:func:`sparseforge.masks.transposable_mask`), so ``W^T`` of the backward ``dX`` product is N:M too.
* **Flip rate** (the paper's Eq. 4): ``r_t = ||m_t - m_{t-1}||_1 / D``, the fraction of mask entries
  that changed since the last step, per layer and over all layers (``trainer.flip_rate``).

Design: the dense weight stays the optimizer's parameter; a ``torch.nn.utils.parametrize``
parametrization on ``module.weight`` (holding the mask as buffer ``mask``) applies the mask in the
forward with the straight-through backward. ``trainer.step()`` after ``optimizer.step()``
recomputes the masks from the new ``|W|`` through :func:`sparseforge.masks.mask_from_scores` and
records the flip rate. ``finalize()`` bakes ``W * m`` into a plain weight and detaches.

Example:
    >>> import torch, torch.nn as nn
    >>> from sparseforge.train import SRSTE
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> trainer = SRSTE(net, opt, pattern="2:4")
    >>> for _ in range(3):
    ...     net(torch.randn(4, 8)).square().mean().backward()
    ...     opt.step(); opt.zero_grad()
    ...     _ = trainer.step()
    >>> len(trainer.flip_rate), sorted(trainer.flip_rate[-1].layers)
    (3, ['0', '2'])
    >>> trainer.finalize(); float((net[0].weight == 0).float().mean())
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseforge.errors import ConfigError
from sparseforge.layers import is_linear
from sparseforge.masks import mask_from_scores, transposable_mask
from sparseforge.patterns import NM, check_fits
from sparseforge.train.base import MaskUpdate, SparseLayer, SparseTrainer
from sparseforge.train.config import SRSTEConfig, STEConfig

__all__ = ["STE", "SRSTE", "FlipRate", "NMMask", "masked_ste", "flow_factor", "structure_schedule"]


def structure_schedule(target: NM, kind: str, levels: int = 3) -> list[NM]:
    """SDGF's patterns after the dense phase (Bambhaniya et al. 2024), the last one ``target``.

    ``stepwise`` (their "sparsify"): M fixed, N = M - 1, then M/2, M/4, ... while above the target N,
    then the target. ``geometric`` (their "fine"): the target density in ever smaller groups,
    ``(N 2^k):(M 2^k)`` for ``k = levels .. 0``.

    Example:
        >>> [str(p) for p in structure_schedule(NM(1, 8), "stepwise")]
        ['7:8', '4:8', '2:8', '1:8']
        >>> [str(p) for p in structure_schedule(NM(1, 8), "geometric")]
        ['8:64', '4:32', '2:16', '1:8']
    """
    n, m = target.n, target.m
    if kind == "stepwise":
        ns = [m - 1]
        half = m // 2
        while half > n:
            if half < ns[-1]:
                ns.append(half)
            half //= 2
        if ns[-1] != n:
            ns.append(n)
        return [NM(k, m) for k in ns if k >= n]
    if kind == "geometric":
        return [NM(n << k, m << k) for k in range(levels, -1, -1)]
    raise ConfigError(f"unknown structure_decay {kind!r}; choose one of stepwise, geometric")


class _MaskedSTE(torch.autograd.Function):
    """``W * (m + flow * ~m)`` forward; backward ``g + decay * (~m) * W`` to ``W`` (decay 0: plain STE)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float, flow: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        if flow:  # MDGF: pruned weights still contribute flow * W
            return weight * torch.where(mask, 1.0, flow).to(weight.dtype)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        if ctx.decay:
            grad = grad + ctx.decay * (~mask) * weight  # SR-STE's sparse-refined term
        return grad, None, None, None


def masked_ste(weight: torch.Tensor, mask: torch.Tensor, decay: float = 0.0, flow: float = 0.0) -> torch.Tensor:
    """``weight * mask`` (pruned entries scaled by ``flow`` instead of 0) whose gradient passes straight
    through to ``weight`` (+ ``decay * (~mask) * weight``)."""
    return _MaskedSTE.apply(weight, mask, float(decay), float(flow))


def flow_factor(t: int, kind: str, coef: float, start: int = 0) -> float:
    """MDGF's mask value of pruned weights after optimizer step ``t`` (1 before ``start``).

    Example:
        >>> flow_factor(50, "linear", 0.01), round(flow_factor(100, "exp", 0.01), 4), flow_factor(5, "none", 0.0)
        (0.5, 0.3679, 0.0)
    """
    if kind == "none":
        return 0.0
    dt = max(0, t - start)
    if kind == "linear":
        return max(0.0, 1.0 - coef * dt)
    if kind == "exp":
        return math.exp(-coef * dt)
    raise ConfigError(f"unknown flow_decay {kind!r}; choose one of none, linear, exp")


class NMMask(nn.Module):
    """Parametrization of a weight: ``masked_ste(W, self.mask, decay, flow)``; ``mask`` in the weight's layout."""

    def __init__(self, mask: torch.Tensor, decay: float, flow: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.decay = decay
        self.flow = flow  # MDGF's beta_t, set by the trainer every step

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return masked_ste(weight, self.mask, self.decay, self.flow)


@dataclass
class FlipRate:
    """Fraction of mask entries that changed at optimizer step ``step``: over all layers and per layer."""

    step: int
    total: float
    layers: dict[str, float] = field(default_factory=dict)


class _NMLayer(SparseLayer):
    @property
    def param(self) -> nn.Parameter:
        return self.module.parametrizations.weight.original  # the dense weight the optimizer updates

    @property
    def weight(self) -> torch.Tensor:
        return self.view(self.param.data)  # (out, in), dense

    @property
    def mask(self) -> torch.Tensor:
        return self.view(self.module.parametrizations.weight[0].mask)  # (out, in)


class STE(SparseTrainer):
    """N:M training with the straight-through estimator; see the module doc."""

    config_class = STEConfig
    decay = 0.0

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: STEConfig | None = None,
                 **fields: Any) -> None:
        # The base class's bookkeeping (masked gradients, zeroed pruned weights) is the opposite of
        # STE's, so only its config checks and layer selection are reused.
        if config is None:
            from sparseforge.config import build_config

            config = build_config(self.config_class, fields, f"{self.config_class.method} config")
        elif fields:
            raise ConfigError(f"pass either a config or keyword options, not both (got {sorted(fields)})")
        if type(config) is not self.config_class:
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config, self.model, self.optimizer = config, model, optimizer
        self.pattern = config.pattern_value
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(config.seed)  # unused: N:M masks from |W| are deterministic
        self._collect = False
        self.flip_rate: list[FlipRate] = []
        for name, module in model.named_modules():
            if is_linear(module) and parametrize.is_parametrized(module, "weight"):
                raise ConfigError(f"layer {name} already has a parametrized weight (another N:M trainer?); "
                                  "call .finalize() or .remove() on that trainer first")
        selected = self._select_layers()
        if config.transposable:
            for layer in selected:
                if layer.weight.shape[0] % self.pattern.m:
                    raise ConfigError(f"layer {layer.name}: out_features={layer.weight.shape[0]} is not divisible by "
                                      f"M={self.pattern.m}, which a transposable mask needs; ignore the layer or "
                                      "set transposable to false")
        self.decay = float(getattr(config, "decay", 0.0))
        self.structure = ([] if config.structure_decay == "none"
                          else structure_schedule(self.pattern, config.structure_decay, config.structure_decay_levels))
        for layer in selected:
            for pattern in self.structure:
                check_fits(pattern, tuple(layer.weight.shape), layer=layer.name)
        self.layers = []
        for layer in selected:
            mask = self._mask_of(layer)  # (out, in)
            mask = (mask.t() if layer.transposed else mask).contiguous()
            parametrize.register_parametrization(layer.module, "weight", self._parametrization(layer, mask))
            self.layers.append(_NMLayer(layer.name, layer.module, layer.sparsity))
        self._set_flow()

    def _parametrization(self, layer: SparseLayer, mask: torch.Tensor) -> nn.Module:
        """The module that turns the dense weight into the forward's weight (``mask`` in the weight's layout)."""
        return NMMask(mask, self.decay)

    @property
    def current_pattern(self) -> NM | None:
        """The N:M pattern the masks follow now: the target, or SDGF's pattern of this step (None: dense)."""
        cfg = self.config
        if not self.structure or self.step_count >= cfg.structure_decay_end:
            return self.pattern
        if self.step_count < cfg.structure_decay_start:
            return None
        span = cfg.structure_decay_end - cfg.structure_decay_start
        return self.structure[(self.step_count - cfg.structure_decay_start) * len(self.structure) // span]

    def _mask_of(self, layer: SparseLayer, final: bool = False) -> torch.Tensor:
        pattern = self.pattern if final else self.current_pattern
        if pattern is None:  # SDGF's dense phase
            return torch.ones(layer.weight.shape, dtype=torch.bool)  # (out, in)
        if self.config.transposable:
            return transposable_mask(layer.weight.abs(), pattern)  # (out, in): N:M both ways
        return mask_from_scores(layer.weight.abs(), pattern, None)  # (out, in): top-N |W| per group of M

    @property
    def flow(self) -> float:
        """MDGF's current mask value of pruned weights (0 without ``flow_decay``)."""
        cfg = self.config
        return flow_factor(self.step_count, cfg.flow_decay, cfg.flow_decay_coef, cfg.flow_decay_start)

    def _set_flow(self, value: float | None = None) -> None:
        flow = self.flow if value is None else value
        for layer in self.layers:
            layer.module.parametrizations.weight[0].flow = flow

    @torch.no_grad()
    def step(self) -> MaskUpdate:
        """Call after every ``optimizer.step()``: recompute the masks from ``|W|``, record the flip rate."""
        if not self.layers:
            raise ConfigError("this N:M trainer was finalized or removed; create a new one to keep training")
        self.step_count += 1
        update = MaskUpdate(self.step_count, 0.0)
        rates, flipped, total = {}, 0, 0
        for layer in self.layers:
            old = layer.mask
            new = self._mask_of(layer)  # (out, in)
            dropped, grown = old & ~new, new & ~old
            n = int(dropped.sum()) + int(grown.sum())
            rates[layer.name] = n / old.numel()
            flipped, total = flipped + n, total + old.numel()
            update.changed[layer.name] = (int(dropped.sum()), int(grown.sum()))
            old.copy_(new)
        update.value = flipped / total
        self.flip_rate.append(FlipRate(self.step_count, update.value, rates))
        self._set_flow()
        return update

    @torch.no_grad()
    def finalize(self) -> None:
        """Bake the N:M mask into the weights (pruned entries ``0``) and detach the trainer."""
        self._set_flow(0.0)  # the baked weight is N:M whatever MDGF's beta_t
        for layer in self.layers:
            layer.mask.copy_(self._mask_of(layer, final=True))  # (out, in), from the current |W|
            parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=True)
        self.layers = []

    def remove(self) -> None:
        """Detach without masking: the dense weights stay as trained."""
        for layer in self.layers:
            parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=False)
        self.layers = []

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "step": self.step_count,
                "masks": {l.name: l.module.parametrizations.weight[0].mask.clone() for l in self.layers},
                "flip_rate": [vars(f).copy() for f in self.flip_rate]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine, theirs = self.config.to_dict(), state.get("config", {})
        if theirs != mine:
            keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ConfigError(f"resuming with a different recipe: {keys} differ from the checkpoint's; use its recipe")
        if set(state["masks"]) != {l.name for l in self.layers}:
            raise ConfigError("checkpoint masks are for other layers than this model's sparsified layers")
        for layer in self.layers:
            layer.module.parametrizations.weight[0].mask.copy_(state["masks"][layer.name])
        self.step_count = int(state["step"])
        self.flip_rate = [FlipRate(**f) for f in state.get("flip_rate", [])]
        self._set_flow()


class SRSTE(STE):
    """SR-STE: STE plus ``decay * (~mask) * W`` on the gradient of the dense weight (``decay = 2e-4``)."""

    config_class = SRSTEConfig
