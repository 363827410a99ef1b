"""DSnoT: training-free prune-and-grow on top of a Wanda / magnitude / SparseGPT mask (Zhang et al., 2024).

"Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs" (ICLR 2024; reference code
zyxxmu/DSnoT, ``lib/prune.py::prune_DSnoT``). Starting from the base method's mask, each output row
swaps kept and pruned weights, without changing any weight value, to shrink the expected
reconstruction error of the row's output. With ``mu_j = E[x_j]`` and ``var_j = Var[x_j]`` over the
calibration tokens and ``D_ij = W_ij * mu_j``:

* the row's error is ``e_i = sum_{j pruned} D_ij`` (the expected output the pruned weights remove);
* **grow**: among pruned weights, ordered by ``D_ij / var_j^p``: if ``e_i > 0`` the largest, else
  the smallest (most negative), walking inwards one per cycle;
* **prune** (unstructured): among kept weights, ordered by the Wanda score ``|W_ij| ||X_j||``
  ascending and split by the sign of ``D_ij``: if ``e_i >= 0`` the next negative-``D`` weight, else
  the next positive-``D`` weight, lowest Wanda score first. N:M: the kept weight of the grown
  weight's own M-block with the lowest base score (never one grown earlier), so every block keeps N;
* the swap happens while ``|e_i| > update_threshold`` and, if ``same_sign``, ``e_i`` keeps its
  initial sign afterwards; a row stops at the first cycle that fails, after ``max_cycles`` at most.

Defaults follow the reference code's: ``max_cycles=50``, ``var_power=1``, the sign check off for
unstructured patterns (its ``--without_same_sign`` defaults to true) and always on for N:M, and
its threshold of 0.1: the reference's ``D`` uses the per-sample token *sum* of ``x_j`` (2048 x the
mean at its calibration length), here ``D`` uses the mean, so the same threshold is
``0.1 / 2048`` (:data:`REFERENCE_THRESHOLD`). ``max_cycles=50`` was set for rows of 4096+ weights;
on narrow layers 50 swaps change a large share of a row (see ``docs/finetune.md``). Differences, each a corner the reference gets wrong:
candidates are only ever pruned (for growth) or kept (for pruning) weights, a row stops when a
candidate list runs out, ``D_ij = 0`` weights sit between the two signs, and ``var_j`` is the
pooled variance over all tokens. The reference skips the MLP layers by default
(``--skip_layer mlp``); here every selected layer is updated (use ``ignore`` to choose).

Example:
    >>> import torch
    >>> from sparseforge.prune.methods import LayerStats, get_method
    >>> stats = LayerStats(8)
    >>> stats.add_batch(torch.randn(64, 8) + 1.0)   # inputs with a non-zero mean
    >>> result = get_method("dsnot").prune(torch.randn(4, 8), stats, "unstructured", 0.5)
    >>> result.mask.sum(1).tolist()                  # every row keeps its count
    [4, 4, 4, 4]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparseforge.errors import ConfigError
from sparseforge.masks import mask_from_scores
from sparseforge.prune.methods.base import LayerStats, PruningMethod
from sparseforge.prune.methods.sparsegpt import inverse_hessian_factor
from sparseforge.patterns import NM, Pattern, Unstructured

__all__ = ["dsnot_update", "DSnoTPruning", "DSnoTOptions", "BASES", "REFERENCE_THRESHOLD"]

BASES = ("wanda", "magnitude", "sparsegpt")
REFERENCE_THRESHOLD = 0.1 / 2048  # the reference's 0.1 on per-sample token sums of 2048-token windows, in mean units


def _pointer_pick(order: torch.Tensor, pointers: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """``order[i, pointers[i, side[i]]]`` per row: the candidate at the chosen end's pointer, shape (out,)."""
    position = pointers.gather(1, side[:, None]).squeeze(1)  # (out,)
    return order.gather(1, position.clamp(0, order.shape[1] - 1)[:, None]).squeeze(1)


def _advance(pointers: torch.Tensor, side: torch.Tensor) -> None:
    """Move the chosen end's pointer one step inwards: the front forward, the back backward."""
    step = torch.where(side == 0, 1, -1)  # (out,)
    pointers.scatter_add_(1, side[:, None], step[:, None])


@torch.no_grad()
def dsnot_update(weight: torch.Tensor, mask: torch.Tensor, input_mean: torch.Tensor, input_var: torch.Tensor,
                 prune_score: torch.Tensor, pattern: Pattern, *, max_cycles: int = 50,
                 update_threshold: float = REFERENCE_THRESHOLD,
                 var_power: float = 1.0, same_sign: bool | None = None) -> torch.Tensor:
    """DSnoT's prune-and-grow cycles on a keep-``mask`` (out, in); returns the new mask (module doc).

    Args:
        weight: (out, in). mask: (out, in) bool, True = kept (the base method's).
        input_mean, input_var: (in,) mean and variance of each input feature over the calibration tokens.
        prune_score: (out, in) the score that orders kept weights for pruning (Wanda's for unstructured,
            the base method's for N:M).
        same_sign: require the error to keep its initial sign; ``None`` = the reference's default
            (off for unstructured, on for N:M).
    """
    w = weight.double()
    keep = mask.clone()
    rows, cols = w.shape
    nm = isinstance(pattern, NM)
    same_sign = nm if same_sign is None else same_sign
    d = w * input_mean.double()[None, :]  # (out, in) expected contribution of each weight
    error = (d * ~keep).sum(1)  # (out,) e_i
    sign0 = torch.sign(error)
    grow_metric = (d / input_var.double().clamp_min(1e-12).pow(var_power)[None, :]).masked_fill(keep, 0.0)
    grow_order = torch.sort(grow_metric, dim=1, stable=True).indices  # (out, in) ascending
    grow_ptr = torch.tensor([0, cols - 1]).repeat(rows, 1)  # (out, 2) front / back pointers
    arange = torch.arange(rows)
    if nm:
        base = prune_score.double().masked_fill(~keep, float("inf"))  # (out, in) kept-at-start only
    else:
        # kept weights by ascending Wanda score; negative D first (front), positive D reversed (back), zeros between
        by_score = torch.sort(prune_score.double().masked_fill(~keep, float("inf")), dim=1, stable=True).indices
        rank = torch.empty_like(by_score)
        rank.scatter_(1, by_score, torch.arange(cols).repeat(rows, 1))  # (out, in) position in score order
        sign = torch.sign(d)
        group = torch.where(~keep, 3, torch.where(sign < 0, 0, torch.where(sign == 0, 1, 2)))  # pruned last
        key = group * (2 * cols) + torch.where(sign > 0, cols - rank, rank)
        prune_order = torch.sort(key, dim=1, stable=True).indices  # (out, in)
        n_kept = keep.sum(1)  # (out,)
        prune_ptr = torch.stack([torch.zeros_like(n_kept), n_kept - 1], 1)  # (out, 2)
    active = torch.ones(rows, dtype=torch.bool)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        grow_side = (error > 0).long()  # e > 0: back (largest); else front
        grow = _pointer_pick(grow_order, grow_ptr, grow_side)  # (out,)
        _advance(grow_ptr, grow_side)
        ok = ~keep[arange, grow] & (grow_ptr[:, 0] <= grow_ptr[:, 1] + 1)
        if nm:
            start = grow - grow % pattern.m  # (out,) first column of the grown weight's block
            cols_in_block = start[:, None] + torch.arange(pattern.m)  # (out, m)
            block = base.gather(1, cols_in_block)  # (out, m)
            low, where = block.min(1)
            prune = start + where
            ok &= torch.isfinite(low)
        else:
            prune_side = (error < 0).long()  # e < 0: back (positive D); else front (negative D)
            prune = _pointer_pick(prune_order, prune_ptr, prune_side)
            _advance(prune_ptr, prune_side)
            ok &= keep[arange, prune] & (prune_ptr[:, 0] <= prune_ptr[:, 1] + 1)
        change = d[arange, prune] - d[arange, grow]  # (out,) e_after - e
        update = active & ok & (error.abs() > update_threshold)
        if same_sign:
            update &= sign0 == torch.sign(error + change)
        keep[arange[update], prune[update]] = False
        keep[arange[update], grow[update]] = True
        if nm:
            base[arange[update], prune[update]] = float("inf")
        error = error + torch.where(update, change, torch.zeros_like(change))
        active = update
    return keep


@dataclass(frozen=True)
class DSnoTOptions:
    base: str = "wanda"  # the one-shot mask DSnoT starts from: wanda, magnitude or sparsegpt (its OBS saliency)
    max_cycles: int = 50
    update_threshold: float = REFERENCE_THRESHOLD
    var_power: float = 1.0
    same_sign: bool | None = None  # None: off for unstructured, on for N:M (the reference's defaults)
    dampening: float = 0.01  # Hessian dampening of the sparsegpt base saliency

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ConfigError(f"dsnot option base must be one of {', '.join(BASES)}, got {self.base!r}")
        if isinstance(self.max_cycles, bool) or not isinstance(self.max_cycles, int) or self.max_cycles < 0:
            raise ConfigError(f"dsnot option max_cycles must be an integer >= 0, got {self.max_cycles!r}")
        for name in ("update_threshold", "var_power", "dampening"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"dsnot option {name} must be a number >= 0, got {value!r}")
        if self.same_sign not in (None, True, False):
            raise ConfigError(f"dsnot option same_sign must be true, false or null, got {self.same_sign!r}")


class DSnoTPruning(PruningMethod):
    """DSnoT (Zhang et al., 2024): the base method's mask, then training-free prune-and-grow (module doc)."""

    name = "dsnot"
    needs_calibration = True
    needs_hessian = False
    Options = DSnoTOptions

    def __init__(self, options: "dict[str, Any] | None" = None) -> None:
        super().__init__(options)
        self.needs_hessian = self.options.base == "sparsegpt"  # instance value, read by the calibration pass

    @property
    def scope(self) -> str:
        return "row"  # the reference ranks weights within each output row

    def base_scores(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """(out, in) float32 scores of the base method (higher = keep)."""
        if self.options.base == "magnitude":
            return weight.abs().float()
        if self.options.base == "wanda":
            return weight.abs().float() * stats.input_sq_norm.sqrt()[None, :]
        h = stats.hessian.clone()  # (in, in)
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1.0
        u, _, _ = inverse_hessian_factor(h, self.options.dampening)  # (in, in) float64 upper
        return (weight.double().pow(2) / torch.diagonal(u).pow(2)[None, :]).float()

    def _prune(self, weight: torch.Tensor, stats: LayerStats | None, pattern: Pattern, sparsity: float):
        assert stats is not None  # checked by PruningMethod.prune
        if not isinstance(pattern, (Unstructured, NM)):
            raise ConfigError(f"dsnot supports unstructured and N:M patterns, got {pattern}")
        scores = self.base_scores(weight, stats)  # (out, in)
        mask = mask_from_scores(scores, pattern, sparsity, scope="row")
        wanda = weight.abs().float() * stats.input_sq_norm.sqrt()[None, :]
        o = self.options
        new = dsnot_update(weight, mask, stats.input_mean, stats.input_var, scores if isinstance(pattern, NM) else wanda,
                           pattern, max_cycles=o.max_cycles, update_threshold=o.update_threshold,
                           var_power=o.var_power, same_sign=o.same_sign)
        swapped = int((new & ~mask).sum())
        return weight.masked_fill(~new, 0.0), new, {"base": o.base, "swapped": swapped}
