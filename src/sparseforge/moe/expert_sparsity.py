"""Weight sparsity inside experts: the project's one-shot pruning methods applied per expert.

Each expert's three matrices are pruned as the linear layers they are, in ``(out, in)``
orientation: ``w_gate[e]``, ``w_up[e]`` (stored (d, h)) as ``(h, d)`` and ``w_down[e]`` (stored
(h, d)) as ``(d, h)``. Every expert gets the pattern and sparsity on its own (the selection never
compares weights of two experts), through :func:`sparseforge.masks.mask_from_scores` inside the
methods of :mod:`sparseforge.prune.methods` (``magnitude``, ``wanda``, ``sparsegpt``). The shared
expert, when there is one, is pruned the same way with every token as its input.

Calibration (Wanda, SparseGPT): :func:`collect_expert_stats` runs batches through the model and
records, per expert, the inputs of the tokens routed to it (for ``w_gate``/``w_up``) and its hidden
activations ``act(x w_gate) * (x w_up)`` (for ``w_down``), as
:class:`~sparseforge.prune.methods.LayerStats`. Routing is taken from the routers' choices (before
capacity drops), in one pass over the unpruned model (not layer by layer as ``sparsify_`` does).
An expert that received no calibration token cannot be scored by Wanda/SparseGPT: that is an
error unless ``empty_experts="magnitude"`` says to prune it by magnitude.

Example:
    >>> import torch
    >>> from sparseforge.masks import satisfies
    >>> from sparseforge.moe import MoE
    >>> from sparseforge.moe.expert_sparsity import sparsify_experts_
    >>> moe = MoE(8, 16, num_experts=4, k=2)
    >>> report = sparsify_experts_(moe, "2:4")
    >>> all(satisfies(moe.w_up[e].t() != 0, "2:4") for e in range(4))
    True
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from sparseforge.errors import ConfigError, DataError
from sparseforge.moe.grouped import ACTIVATIONS
from sparseforge.moe.layer import MoE
from sparseforge.prune.methods import LayerStats, get_method

__all__ = ["collect_expert_stats", "sparsify_experts_", "ExpertStats", "SHARED"]

SHARED = "shared"  # expert key of the shared expert

# stats key: (layer name, expert index or SHARED, "in" | "hidden")
ExpertStats = dict[tuple[str, "int | str", str], LayerStats]


def _layers(model: nn.Module) -> dict[str, MoE]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    if not layers:
        raise ConfigError("no sparseforge MoE layer in the model (swap transformers blocks in with moe_ first)")
    return layers


def _hidden(x, w_up, w_gate, activation):
    act = ACTIVATIONS[activation][0]
    return act(x @ w_up) if w_gate is None else act(x @ w_gate) * (x @ w_up)  # (n, h)


@torch.no_grad()
def collect_expert_stats(model: nn.Module, batches: Iterable, *, hessian: bool = False, forward=None) -> ExpertStats:
    """Per-expert input and hidden statistics over ``batches`` (``forward(model, batch)`` or
    ``model(batch)``). ``hessian=True`` also accumulates ``2 X^T X / n`` (SparseGPT)."""
    layers = _layers(model)
    stats: ExpertStats = {}
    for name, m in layers.items():
        for e in list(range(m.num_experts)) + ([SHARED] if m.shared is not None else []):
            h = m.d_hidden if e != SHARED else m.shared.w_up.shape[1]
            stats[(name, e, "in")] = LayerStats(m.d_model, hessian=hessian)
            stats[(name, e, "hidden")] = LayerStats(h, hessian=hessian)

    def hook(mod, args, output, _name):
        x = args[0].reshape(-1, mod.d_model)  # (T, d)
        experts = output[1].experts  # (T, k)
        for e in range(mod.num_experts):
            rows = (experts == e).any(dim=1).nonzero().reshape(-1)
            if rows.numel() == 0:
                continue
            xe = x.index_select(0, rows)  # (n_e, d)
            stats[(_name, e, "in")].add_batch(xe)
            w_gate = None if mod.w_gate is None else mod.w_gate[e]
            stats[(_name, e, "hidden")].add_batch(_hidden(xe, mod.w_up[e], w_gate, mod.activation))
        if mod.shared is not None:
            s = mod.shared
            stats[(_name, SHARED, "in")].add_batch(x)
            stats[(_name, SHARED, "hidden")].add_batch(_hidden(x, s.w_up, s.w_gate, mod.activation))

    handles = [m.register_forward_hook(lambda mod, a, o, _n=n: hook(mod, a, o, _n)) for n, m in layers.items()]
    try:
        for batch in batches:
            model(batch) if forward is None else forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def _matrices(m: MoE, e):
    """``(param name, input-major weight (in, out), stats kind)`` of expert ``e``."""
    src = m.shared if e == SHARED else None
    get = (lambda w: getattr(src, w)) if src is not None else (lambda w: getattr(m, w)[e])
    out = []
    if m.w_gate is not None:
        out.append(("w_gate", get("w_gate"), "in"))
    out += [("w_up", get("w_up"), "in"), ("w_down", get("w_down"), "hidden")]
    return out


@torch.no_grad()
def sparsify_experts_(
    model: nn.Module,
    pattern="unstructured",
    sparsity: float | None = None,
    *,
    method: str = "magnitude",
    method_options: dict | None = None,
    stats: ExpertStats | None = None,
    shared: bool = True,
    empty_experts: str = "error",
) -> dict[tuple[str, "int | str", str], float]:
    """Prune every expert matrix of every MoE layer in ``model`` (or of an :class:`MoE`), in place.

    Args:
        pattern, sparsity: as in :func:`sparseforge.masks.mask_from_scores` (``"2:4"``,
            ``"unstructured"`` with ``sparsity=0.5``, ...), applied to each ``(out, in)`` matrix.
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``; the latter two need ``stats``
            from :func:`collect_expert_stats` (SparseGPT with ``hessian=True``).
        shared: prune the shared expert too.
        empty_experts: ``"error"`` or ``"magnitude"``: what to do with an expert no calibration
            token reached.
    Returns:
        ``{(layer, expert, matrix): achieved sparsity}``.
    """
    if empty_experts not in ("error", "magnitude"):
        raise ConfigError(f"empty_experts must be 'error' or 'magnitude', got {empty_experts!r}")
    pruner = get_method(method, method_options)
    magnitude = get_method("magnitude")
    if pruner.needs_calibration and stats is None:
        raise DataError(f"{method} needs calibration statistics: stats = collect_expert_stats(model, batches"
                        f"{', hessian=True' if pruner.needs_hessian else ''})")
    plan = []  # (layer, expert, matrix name, weight, stats, method): all checked before any weight changes
    for name, m in _layers(model).items():
        experts = list(range(m.num_experts)) + ([SHARED] if shared and m.shared is not None else [])
        for e in experts:
            for wname, w, kind in _matrices(m, e):
                st = stats.get((name, e, kind)) if stats is not None else None
                use = pruner
                if pruner.needs_calibration and (st is None or st.num_tokens == 0):
                    if empty_experts == "error":
                        raise DataError(
                            f"no calibration token reached expert {e} of MoE layer {name or '<root>'!r}; use more "
                            "calibration data, prune unused experts first (prune_experts_), or pass "
                            "empty_experts='magnitude'"
                        )
                    use = magnitude
                plan.append((name, e, wname, w, st, use))
    report = {}
    for name, e, wname, w, st, use in plan:
        result = use.prune(w.t(), st, pattern, sparsity)  # (out, in)
        w.copy_(result.weight.t().to(w.dtype))
        report[(name, e, wname)] = result.info["achieved_sparsity"]
    return report
