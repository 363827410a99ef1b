"""Routers: turn router logits ``(T, E)`` into expert choices ``(T, k)`` and gate weights ``(T, k)``.

Every router is a small ``nn.Module`` without parameters (the router's linear layer lives in
:class:`~sparseforge.moe.layer.MoE`) and returns a :class:`Routing`:

* ``experts`` ``(T, k)`` int64: the chosen experts of each token, best first. ``-1`` marks an empty
  slot (a token with fewer than ``k`` experts: dropped by capacity, below a threshold, or picked by
  fewer experts under expert-choice routing). Empty slots carry weight 0.
* ``weights`` ``(T, k)``: the gate weight of each slot, differentiable w.r.t. the logits.
* ``probs`` ``(T, E)``, same precision: the router distribution the load-balancing loss uses.

Routers here:

==================  ============================================================================
``softmax_topk``    softmax, then the ``k`` largest; renormalised to sum 1 (Mixtral) or not
                    (Qwen2-MoE ``norm_topk_prob=False``; Shazeer et al. 2017 without noise).
``switch``          top-1 (Fedus et al. 2021, Switch Transformer): weight = p of the chosen
                    expert, the gate through which the router learns; ``hard=True`` gives a
                    straight-through gate (forward weight 1, gradient of p).
``expert_choice``   each expert picks its ``capacity`` best tokens (Zhou et al. 2022).
``sigmoid``         independent sigmoid scores; experts above ``threshold``, at most ``k``
                    (DeepSeek-V3 style top-k when ``threshold=0``, XMoE-like threshold routing).
``sparsemixer``     SparseMixer (Liu et al. 2023), see :mod:`sparseforge.moe.sparsemixer`.
==================  ============================================================================

Top-k ties keep the lower expert index (a stable descending sort, the same rule as
:func:`sparseforge.masks.topk_mask`); routing keeps ranked indices and differentiable gate values,
which a bool mask does not carry, so it does not go through :func:`~sparseforge.masks.mask_from_scores`.

Example:
    >>> import torch
    >>> from sparseforge.moe.routers import make_router
    >>> router = make_router("softmax_topk", num_experts=4, k=2)
    >>> r = router(torch.tensor([[0.0, 3.0, 1.0, 2.0]]))
    >>> r.experts.tolist()
    [[1, 3]]
    >>> [round(w, 4) for w in r.weights[0].tolist()]
    [0.7311, 0.2689]
"""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple

import torch
from torch import nn

from sparseforge.errors import ConfigError

__all__ = [
    "Routing",
    "Router",
    "SoftmaxTopK",
    "SwitchTop1",
    "ExpertChoice",
    "SigmoidRouter",
    "ROUTERS",
    "make_router",
    "ranked_topk",
    "capacity_for",
    "router_float",
]


class Routing(NamedTuple):
    """What a router returns; unpacks as ``experts, weights, probs``."""

    experts: torch.Tensor  # (T, k) int64, -1 = empty slot
    weights: torch.Tensor  # (T, k), 0 at empty slots
    probs: torch.Tensor  # (T, E), for the load-balancing loss


def ranked_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of each row of ``values`` (T, E), best first; ties keep the lower index."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]  # (T, k)
    return values.gather(-1, order), order


def capacity_for(capacity_factor: float, num_tokens: int, k: int, num_experts: int) -> int:
    """Slots per expert: ``ceil(capacity_factor * T * k / E)`` (Switch Transformer), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def router_float(logits: torch.Tensor) -> torch.Tensor:
    """Logits in the routing precision: float32 for 16-bit inputs (as Mixtral), else unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _check_common(num_experts: int, k: int) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ConfigError(f"num_experts must be a positive integer, got {num_experts!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k (experts per token) must be a positive integer, got {k!r}")
    if k > num_experts:
        raise ConfigError(
            f"k={k} experts per token but only {num_experts} experts exist; use k <= num_experts"
        )


class Router(nn.Module):
    """Base class. ``token_choice`` routers pick experts per token (capacity is applied after them
    by the layer); expert-choice routers receive the capacity and apply it themselves."""

    token_choice: bool = True

    def __init__(self, num_experts: int, k: int) -> None:
        super().__init__()
        _check_common(num_experts, k)
        self.num_experts = num_experts
        self.k = k

    def forward(
        self,
        logits: torch.Tensor,
        *,
        capacity: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}"

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_experts:
            raise ConfigError(
                f"router logits must be (tokens, {self.num_experts}), got {tuple(logits.shape)}"
            )


class SoftmaxTopK(Router):
    """Softmax over experts, keep the ``k`` largest (Mixtral when ``renormalize=True``)."""

    def __init__(self, num_experts: int, k: int, renormalize: bool = True) -> None:
        super().__init__(num_experts, k)
        self.renormalize = renormalize

    def forward(self, logits, *, capacity=None, generator=None) -> Routing:
        self._check_logits(logits)
        probs = torch.softmax(router_float(logits), dim=-1)  # (T, E)
        weights, experts = ranked_topk(probs, self.k)  # (T, k), (T, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # (T, k)
        return Routing(experts, weights, probs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, renormalize={self.renormalize}"


class SwitchTop1(Router):
    """Switch Transformer top-1 (Fedus et al. 2021): the argmax expert, weight ``p_D``.

    The router learns only through the gate value ``p_D`` that scales the expert output (the
    proxy that SparseMixer replaces). ``hard=True`` makes the gate straight-through: the forward
    weight is exactly 1 and the backward pass uses the gradient of ``p_D``.
    """

    def __init__(self, num_experts: int, k: int = 1, hard: bool = False) -> None:
        if k != 1:
            raise ConfigError(f"switch routing is top-1, got k={k}; use softmax_topk for k > 1")
        super().__init__(num_experts, 1)
        self.hard = hard

    def forward(self, logits, *, capacity=None, generator=None) -> Routing:
        self._check_logits(logits)
        probs = torch.softmax(router_float(logits), dim=-1)  # (T, E)
        weights, experts = ranked_topk(probs, 1)  # (T, 1)
        if self.hard:
            weights = weights - weights.detach() + 1.0  # (T, 1), value exactly 1, gradient of p_D
        return Routing(experts, weights, probs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hard={self.hard}"


def _slots_from_pairs(
    token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack (token, expert, weight) pairs into per-token slots ``(T, k_max)``, -1 / 0 padded.

    Slots of a token keep the order of the pairs (callers pass them best first).
    """
    n = token.numel()
    order = torch.sort(token, stable=True).indices  # (n,) pairs grouped by token
    tok_sorted = token[order]
    counts = torch.bincount(tok_sorted, minlength=num_tokens)  # (T,)
    width = max(1, int(counts.max())) if n else 1
    start = torch.cumsum(counts, 0) - counts  # (T,) first pair of each token
    slot = torch.arange(n, device=token.device) - start[tok_sorted]  # (n,) rank within its token
    experts = torch.full((num_tokens, width), -1, dtype=torch.long, device=token.device)
    experts[tok_sorted, slot] = expert[order]
    weights = torch.zeros(num_tokens, width, dtype=weight.dtype, device=weight.device)
    weights = weights.index_put((tok_sorted, slot), weight[order])  # differentiable
    return experts, weights


class ExpertChoice(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its ``capacity`` best tokens.

    Scores are the softmax over experts; expert ``e`` takes the ``capacity`` tokens with the
    highest ``p[:, e]`` (ties: lower token index). A token may get 0..E experts; the result has as
    many slots as the busiest token needs. ``k`` sets the average load:
    ``capacity = ceil(capacity_factor * T * k / E)``, computed by the layer.
    """

    token_choice = False

    def forward(self, logits, *, capacity=None, generator=None) -> Routing:
        self._check_logits(logits)
        if capacity is None:
            raise ConfigError(
                "expert_choice routing needs a capacity: set capacity_factor (e.g. 1.0) on the MoE layer"
            )
        num_tokens = logits.shape[0]
        probs = torch.softmax(router_float(logits), dim=-1)  # (T, E)
        cap = min(capacity, num_tokens)
        top_p, top_tok = ranked_topk(probs.t(), cap)  # (E, C) each expert's best tokens
        expert_ids = torch.arange(self.num_experts, device=logits.device).repeat_interleave(cap)
        # pairs ordered expert-major; within a token, experts come in increasing index order
        experts, weights = _slots_from_pairs(top_tok.reshape(-1), expert_ids, top_p.reshape(-1), num_tokens)
        return Routing(experts, weights, probs)


class SigmoidRouter(Router):
    """Independent sigmoid scores; a token takes the experts scoring above ``threshold``.

    With ``k`` set, at most the ``k`` best of them (``threshold=0.0`` gives plain sigmoid top-k as
    in DeepSeek-V3 without its bias term); ``k=None`` keeps every expert above the threshold
    (threshold routing; a token may get no expert). ``renormalize`` divides the kept scores by
    their sum. ``probs`` for the load-balancing loss are the scores normalised per token.
    """

    def __init__(
        self, num_experts: int, k: int | None = None, threshold: float = 0.5, renormalize: bool = False
    ) -> None:
        super().__init__(num_experts, num_experts if k is None else k)
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"sigmoid threshold must be in [0, 1), got {threshold!r}")
        self.capped = k is not None
        self.threshold = threshold
        self.renormalize = renormalize

    def forward(self, logits, *, capacity=None, generator=None) -> Routing:
        self._check_logits(logits)
        scores = torch.sigmoid(router_float(logits))  # (T, E)
        weights, experts = ranked_topk(scores, self.k)  # (T, k)
        keep = weights > self.threshold  # (T, k), a prefix of each row (sorted)
        width = max(1, int(keep.sum(-1).max())) if keep.numel() else 1
        keep, weights, experts = keep[:, :width], weights[:, :width], experts[:, :width]
        experts = experts.masked_fill(~keep, -1)
        weights = weights * keep
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        probs = scores / scores.sum(-1, keepdim=True)  # (T, E)
        return Routing(experts, weights, probs)

    def extra_repr(self) -> str:
        k = self.k if self.capped else None
        return f"num_experts={self.num_experts}, k={k}, threshold={self.threshold}, renormalize={self.renormalize}"


# name -> "module:Class" (SparseMixer lives in its own module)
ROUTERS = {
    "softmax_topk": "routers:SoftmaxTopK",
    "switch": "routers:SwitchTop1",
    "expert_choice": "routers:ExpertChoice",
    "sigmoid": "routers:SigmoidRouter",
    "sparsemixer": "sparsemixer:SparseMixer",
}


def make_router(name: str, num_experts: int, k: int, **kwargs) -> Router:
    """Build a router by name; unknown names and bad options are :class:`ConfigError`."""
    target = ROUTERS.get(name) if isinstance(name, str) else None
    if target is None:
        raise ConfigError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}")
    module, cls_name = target.split(":")
    cls = getattr(importlib.import_module(f"sparseforge.moe.{module}"), cls_name)
    try:
        return cls(num_experts, k, **kwargs)
    except TypeError as exc:  # unexpected keyword argument
        raise ConfigError(f"bad options for router {name!r}: {exc}") from None
