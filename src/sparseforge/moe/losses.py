"""Auxiliary MoE losses, returned per call (no global state).

* Load-balancing loss (Fedus et al. 2021, Switch Transformer): ``E * sum_e f_e * P_e`` with
  ``f_e`` the share of routing assignments (before capacity dropping) that chose expert ``e`` and
  ``P_e`` the mean router probability of ``e``. It is 1 for perfectly uniform routing, for any
  ``k`` (transformers' Mixtral ``load_balancing_loss_func`` sums over the ``k`` choices and gives
  ``k`` times this value).
* Router z-loss (Zoph et al. 2022, ST-MoE): ``mean_t logsumexp(z_t)^2`` of the router logits.

Example:
    >>> import torch
    >>> from sparseforge.moe.losses import load_balancing_loss
    >>> experts = torch.tensor([[0], [1], [2], [3]])  # round robin over 4 experts
    >>> float(load_balancing_loss(experts, torch.full((4, 4), 0.25)))
    1.0
"""

from __future__ import annotations

from functools import cached_property

import torch

from sparseforge.moe.routers import router_float

__all__ = ["MoEAux", "load_balancing_loss", "router_z_loss"]


def load_balancing_loss(experts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss ``E * sum_e f_e P_e`` for choices ``experts`` (T, k) (-1 = empty).

    0 for an empty batch.
    """
    num_experts = probs.shape[1]
    if probs.shape[0] == 0:
        return probs.sum()  # 0, still connected to the graph
    counts = torch.bincount(experts.reshape(-1) + 1, minlength=num_experts + 1)[1:]  # (E,)
    frac = counts.to(probs.dtype) / counts.sum().clamp_min(1)  # (E,) f_e
    return num_experts * torch.dot(frac, probs.mean(0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: ``mean_t logsumexp(logits_t)^2`` (0 for an empty batch)."""
    if logits.shape[0] == 0:
        return router_float(logits).sum()
    return torch.logsumexp(router_float(logits), dim=-1).square().mean()


class MoEAux:
    """Auxiliary losses and routing statistics of one forward call.

    The losses are computed on first access (a decode step that never reads them does not pay for
    them) from the routing this call made; they stay differentiable w.r.t. the router.
    """

    def __init__(self, router_logits, router_probs, experts, tokens_per_expert, dropped_fraction, lb_coef, z_coef):
        self.router_logits: torch.Tensor = router_logits  # (T, E)
        self.router_probs: torch.Tensor = router_probs  # (T, E)
        self.experts: torch.Tensor = experts  # (T, k) choices before capacity dropping, -1 = empty
        self.tokens_per_expert: torch.Tensor = tokens_per_expert  # (E,) int64, assignments processed
        self.dropped_fraction: float = dropped_fraction  # share of assignments dropped by capacity
        self.lb_coef, self.z_coef = lb_coef, z_coef

    @cached_property
    def load_balancing_loss(self) -> torch.Tensor:
        """Scalar, 1.0 when routing is uniform (Switch Transformer)."""
        return load_balancing_loss(self.experts, self.router_probs)

    @cached_property
    def z_loss(self) -> torch.Tensor:
        """Scalar router z-loss (ST-MoE)."""
        return router_z_loss(self.router_logits)

    @cached_property
    def loss(self) -> torch.Tensor:
        """``lb_coef * load_balancing_loss + z_coef * z_loss``: add it to the training loss."""
        return self.lb_coef * self.load_balancing_loss + self.z_coef * self.z_loss

    def __repr__(self) -> str:
        return (
            f"MoEAux(tokens_per_expert={self.tokens_per_expert.tolist()}, "
            f"dropped_fraction={self.dropped_fraction:.4f})"
        )
