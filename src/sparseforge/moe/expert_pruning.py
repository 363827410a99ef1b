"""Expert pruning by routing statistics (Chen et al., *Task-Specific Expert Pruning for Sparse
Mixture-of-Experts*, 2022): keep the experts a task uses, progressively, down to one dense expert.

Routing statistics come from calibration (or fine-tuning) data: for every MoE layer,
:class:`RoutingStats` counts the assignments each expert receives (*hit rate*) and sums its router
probability over tokens (*alpha score*, the gating weight). An expert's **proficiency** is the
product of its normalised alpha score and its hit rate, renormalised over the experts alive
(our reading of the paper's criterion, which combines the two; the exact formula is not in the
material we had).

* One shot: :func:`collect_routing_stats` on calibration batches, then
  :func:`prune_experts_` ``(model, stats, num_experts)`` keeps the ``num_experts`` most proficient
  experts of every layer (ties: lower index).
* Progressive (the paper): :class:`ProgressiveExpertPruner` accumulates statistics over training
  windows; at the end of each window it drops experts whose cumulative proficiency is below
  ``beta / n_alive`` (``beta < 1``: under a fraction of the uniform share), never below the
  target, and the last window force-drops to the target.
* One expert left: with softmax-family routers its gate weight is exactly 1, so the layer *is* a
  plain MLP; :func:`to_dense` builds that :class:`DenseMLP` (``nn.Linear`` layers, so the one-shot
  weight-pruning methods and :func:`sparseforge.compress_` apply to it), and
  :func:`prune_experts_` puts it in place of a :class:`~sparseforge.moe.swap.MoEBlock`.

Example:
    >>> import torch
    >>> from sparseforge.moe import MoE
    >>> from sparseforge.moe.expert_pruning import RoutingStats, prune_experts, to_dense
    >>> moe = MoE(8, 16, num_experts=4, k=2).eval()
    >>> stats = RoutingStats(4)
    >>> stats.add(moe(torch.randn(32, 8))[1])
    >>> keep = stats.select(1)
    >>> dense = to_dense(prune_experts(moe, keep))
    >>> dense(torch.randn(3, 8)).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from sparseforge.errors import ConfigError, DataError
from sparseforge.masks import topk_mask
from sparseforge.moe.dense import DenseMLP, to_dense
from sparseforge.moe.layer import MoE
from sparseforge.moe.losses import MoEAux
from sparseforge.moe.swap import MoEBlock, collect_aux, set_module

__all__ = [
    "RoutingStats", "collect_routing_stats", "prune_experts", "prune_experts_", "to_dense", "DenseMLP",
    "ProgressiveExpertPruner",
]


class RoutingStats:
    """Per-expert routing statistics of one MoE layer, accumulated over calls (float64)."""

    def __init__(self, num_experts: int) -> None:
        self.hits = torch.zeros(num_experts, dtype=torch.float64)  # (E,) assignments received
        self.alpha = torch.zeros(num_experts, dtype=torch.float64)  # (E,) sum_t p_e(x_t)
        self.tokens = 0

    @property
    def num_experts(self) -> int:
        return self.hits.numel()

    def add(self, aux: MoEAux) -> None:
        """Accumulate one call's routing (``aux.experts`` before capacity drops, ``aux.router_probs``)."""
        probs = aux.router_probs.detach()
        if probs.shape[1] != self.num_experts:
            raise DataError(f"routing over {probs.shape[1]} experts added to statistics of {self.num_experts}")
        experts = aux.experts.reshape(-1).cpu()
        self.hits += torch.bincount(experts + 1, minlength=self.num_experts + 1)[1:].double()
        self.alpha += probs.sum(0).double().cpu()
        self.tokens += probs.shape[0]

    def proficiency(self) -> torch.Tensor:
        """(E,) normalised alpha score x hit rate, renormalised to sum 1."""
        if self.tokens == 0:
            raise DataError("no routing statistics: run calibration data through the model first")
        alpha = self.alpha / self.alpha.sum().clamp_min(1e-300)
        hit = self.hits / self.hits.sum().clamp_min(1.0)
        prof = alpha * hit
        total = prof.sum()
        return prof / total if total > 0 else alpha

    def select(self, num_experts: int) -> list[int]:
        """Indices (ascending) of the ``num_experts`` most proficient experts; ties keep the lower index."""
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= self.num_experts:
            raise ConfigError(f"num_experts to keep must be in 1..{self.num_experts}, got {num_experts!r}")
        keep = topk_mask(self.proficiency().reshape(1, -1), num_experts).reshape(-1)  # (E,)
        return keep.nonzero().reshape(-1).tolist()

    def subset(self, keep: list[int]) -> "RoutingStats":
        """Statistics of the kept experts, re-indexed 0..len(keep)-1."""
        out = RoutingStats(len(keep))
        out.hits, out.alpha, out.tokens = self.hits[keep].clone(), self.alpha[keep].clone(), self.tokens
        return out


def _moe_layers(model: nn.Module) -> dict[str, MoE]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


@torch.no_grad()
def collect_routing_stats(model: nn.Module, batches: Iterable, forward=None) -> dict[str, RoutingStats]:
    """Run ``batches`` through ``model`` and return ``{MoE module name: RoutingStats}``.

    ``forward(model, batch)`` defaults to ``model(batch)``. The model's train/eval mode is used
    as it is (eval: deterministic routing).
    """
    layers = _moe_layers(model)
    if not layers:
        raise ConfigError("the model has no sparseforge MoE layer (swap transformers blocks in with moe_ first)")
    stats = {name: RoutingStats(m.num_experts) for name, m in layers.items()}
    for batch in batches:
        with collect_aux(model) as auxes:
            model(batch) if forward is None else forward(model, batch)
        for name, aux in auxes:
            stats[name].add(aux)
    return stats


def _resized_router(router, num_experts: int, k: int):
    out = copy.deepcopy(router)
    out.num_experts = num_experts
    out.k = num_experts if not getattr(router, "capped", True) else k
    return out


@torch.no_grad()
def prune_experts(moe: MoE, keep: list[int]) -> MoE:
    """A copy of ``moe`` with only the experts ``keep`` (router rows too); ``k`` becomes
    ``min(k, len(keep))``. The shared expert is kept."""
    if not keep or len(set(keep)) != len(keep) or not all(0 <= e < moe.num_experts for e in keep):
        raise ConfigError(f"keep must list distinct experts in 0..{moe.num_experts - 1}, got {keep!r}")
    keep = sorted(keep)
    idx = torch.tensor(keep, device=moe.w_up.device)
    new = copy.deepcopy(moe)
    E = len(keep)
    new.gate = nn.Linear(moe.d_model, E, bias=False, device=moe.w_up.device, dtype=moe.gate.weight.dtype)
    new.gate.weight.copy_(moe.gate.weight[idx])  # (E', d)
    new.w_up = nn.Parameter(moe.w_up[idx].clone())  # (E', d, h)
    new.w_down = nn.Parameter(moe.w_down[idx].clone())  # (E', h, d)
    new.w_gate = None if moe.w_gate is None else nn.Parameter(moe.w_gate[idx].clone())
    new.num_experts = E
    new.router = _resized_router(moe.router, E, min(moe.k, E))
    new.k = new.router.k
    return new


def _replace(model: nn.Module, name: str, moe: MoE) -> None:
    """Put ``moe`` at ``name``; a one-expert layer inside a :class:`MoEBlock` becomes a :class:`DenseMLP`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if moe.num_experts == 1 and isinstance(parent, MoEBlock) and child == "moe":
        set_module(model, parent_name, to_dense(moe))
    else:
        set_module(model, name, moe)


def prune_experts_(model: nn.Module, stats: dict[str, RoutingStats], num_experts: int) -> dict[str, list[int]]:
    """Keep the ``num_experts`` most proficient experts of every MoE layer of ``model``, in place.

    Returns ``{layer name: kept expert indices}``. At ``num_experts=1`` every layer wrapped in a
    :class:`MoEBlock` becomes a :class:`DenseMLP`; a bare :class:`MoE` stays a one-expert layer
    (``to_dense`` gives the MLP; its caller expects ``(y, aux)``).
    """
    layers = _moe_layers(model)
    missing = sorted(set(layers) - set(stats))
    if missing:
        raise DataError(f"no routing statistics for MoE layers {missing}; run collect_routing_stats on this model")
    kept = {}
    for name, moe in layers.items():
        keep = stats[name].select(num_experts)
        _replace(model, name, prune_experts(moe, keep))
        kept[name] = keep
    return kept


class ProgressiveExpertPruner:
    """Progressive task-specific expert pruning during fine-tuning (Chen et al. 2022).

    Example::

        pruner = ProgressiveExpertPruner(model, target=1, num_windows=4, beta=0.5)
        for step, batch in enumerate(batches):
            with collect_aux(model) as auxes:
                loss = task_loss(model(batch)) + sum(a.loss for _, a in auxes)
            pruner.observe(auxes)
            loss.backward(); opt.step(); opt.zero_grad()
            if (step + 1) % window_steps == 0:
                pruner.end_window()          # rebuild the optimizer: parameters were replaced

    At the end of window ``i`` (1-based) every layer drops the experts whose cumulative
    proficiency is below ``beta / n_alive``, keeping at least ``target``; after the last window
    (``i == num_windows``) every layer keeps exactly its ``target`` best. Statistics of the
    surviving experts carry over to the next window.
    """

    def __init__(self, model: nn.Module, target: int = 1, num_windows: int = 4, beta: float = 0.5) -> None:
        self.model = model
        if isinstance(num_windows, bool) or not isinstance(num_windows, int) or num_windows < 1:
            raise ConfigError(f"num_windows must be a positive integer, got {num_windows!r}")
        if not 0.0 < beta <= 1.0:
            raise ConfigError(f"beta must be in (0, 1], got {beta!r}")
        layers = _moe_layers(model)
        if not layers:
            raise ConfigError("the model has no sparseforge MoE layer")
        for name, m in layers.items():
            if isinstance(target, bool) or not isinstance(target, int) or not 1 <= target <= m.num_experts:
                raise ConfigError(f"target must be in 1..{m.num_experts} (layer {name}), got {target!r}")
        self.target, self.num_windows, self.beta = target, num_windows, beta
        self.window = 0
        self.stats = {name: RoutingStats(m.num_experts) for name, m in layers.items()}
        self.history: list[dict[str, list[int]]] = []  # kept original expert ids after each window
        self._origin = {name: list(range(m.num_experts)) for name, m in layers.items()}

    def observe(self, auxes: list[tuple[str, MoEAux]]) -> None:
        """Add the ``(name, aux)`` pairs of one step (from :func:`collect_aux`)."""
        for name, aux in auxes:
            if name in self.stats:
                self.stats[name].add(aux)

    def end_window(self) -> dict[str, list[int]]:
        """Drop experts; returns ``{layer name: original ids of the experts kept}``."""
        if self.window >= self.num_windows:
            raise ConfigError(f"all {self.num_windows} windows are over")
        self.window += 1
        final = self.window == self.num_windows
        layers = _moe_layers(self.model)
        kept = {}
        for name in list(self.stats):
            moe, st = layers[name], self.stats[name]
            n = st.num_experts
            if final:
                keep = st.select(self.target)
            else:
                prof = st.proficiency()
                above = int((prof >= self.beta / n).sum())
                keep = st.select(max(self.target, above))
            if len(keep) < n:
                _replace(self.model, name, prune_experts(moe, keep))
                self.stats[name] = st.subset(keep)
                self._origin[name] = [self._origin[name][e] for e in keep]
            kept[name] = list(self._origin[name])
            if self.stats[name].num_experts == 1 and name not in _moe_layers(self.model):
                del self.stats[name]  # became a DenseMLP
        self.history.append(kept)
        return kept
