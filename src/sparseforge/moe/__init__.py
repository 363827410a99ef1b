"""Sparse mixture-of-experts: one layer, pluggable routers, SparseMixer, sort-based CPU dispatch.

Importing ``sparseforge`` does not import this subpackage (``import sparseforge.moe`` does; it
needs only torch).

Example:
    >>> import torch
    >>> from sparseforge.moe import MoE
    >>> moe = MoE(d_model=8, d_hidden=16, num_experts=4, k=1, router="sparsemixer", seed=0)
    >>> y, aux = moe(torch.randn(3, 8))
    >>> y.shape, aux.tokens_per_expert.sum().item()
    (torch.Size([3, 8]), 3)
"""

from sparseforge.moe.dispatch import apply_capacity, build_plan
from sparseforge.moe.grouped import grouped_ffn
from sparseforge.moe.losses import MoEAux, load_balancing_loss, router_z_loss
from sparseforge.moe.config import MoEConfig
from sparseforge.moe.layer import MoE
from sparseforge.moe.routers import (
    ROUTERS,
    ExpertChoice,
    Router,
    Routing,
    SigmoidRouter,
    SoftmaxTopK,
    SwitchTop1,
    make_router,
)
from sparseforge.moe.sparsemixer import SparseMixer, SparseMixerNoise, sparsemixer_route
from sparseforge.moe.swap import MoEBlock, MoESwapReport, collect_aux, moe_
from sparseforge.moe.expert_pruning import (
    DenseMLP,
    ProgressiveExpertPruner,
    RoutingStats,
    collect_routing_stats,
    prune_experts,
    prune_experts_,
    to_dense,
)
from sparseforge.moe.parallel import ExpertParallelMoE
from sparseforge.moe.expert_sparsity import collect_expert_stats, sparsify_experts_
from sparseforge.moe.upcycle import UpcycleReport, upcycle_, upcycle_mlp

__all__ = [
    "MoE",
    "MoEConfig",
    "MoEAux",
    "load_balancing_loss",
    "router_z_loss",
    "Router",
    "Routing",
    "SoftmaxTopK",
    "SwitchTop1",
    "ExpertChoice",
    "SigmoidRouter",
    "SparseMixer",
    "SparseMixerNoise",
    "sparsemixer_route",
    "ROUTERS",
    "make_router",
    "build_plan",
    "apply_capacity",
    "grouped_ffn",
    "moe_",
    "MoEBlock",
    "MoESwapReport",
    "collect_aux",
    "upcycle_",
    "upcycle_mlp",
    "UpcycleReport",
    "RoutingStats",
    "collect_routing_stats",
    "prune_experts",
    "prune_experts_",
    "to_dense",
    "DenseMLP",
    "ProgressiveExpertPruner",
    "collect_expert_stats",
    "sparsify_experts_",
    "ExpertParallelMoE",
]
