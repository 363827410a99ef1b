"""Pure mask math of sparse training: random init, gradual pruning, drop-and-grow.

No model, no optimizer: tensors in, masks out, so every rule is unit-testable. All selection
goes through :func:`sparseforge.masks.mask_from_scores` (deterministic tie-breaking: the lower
row-major index wins). Entries that must not be chosen get a score below every real score
(``min(scores, 0) - 1``), so "the top k among the candidates" is an ordinary top-k.

Masks are ``(out, in)`` bool tensors, ``True`` = active. Patterns work on *units*: single weights
(unstructured, fan-in), ``h x w`` tiles (block) or whole rows (channel); fan-in counts units per
row, the others per layer. N:M fixes the sparsity of every group of M, so it has neither a
gradual ramp nor a drop-and-grow here (N:M training with STE / SR-STE is a separate method).

Example (RigL's update on one row: drop the smallest active ``|w|``, grow the largest ``|g|``
among the rest):
    >>> import torch
    >>> from sparseforge.train.updates import drop_and_grow
    >>> mask = torch.tensor([[True, True, True, False, False, False]])
    >>> w = torch.tensor([[0.9, 0.1, 0.5, 0.0, 0.0, 0.0]])
    >>> g = torch.tensor([[0.0, 0.0, 0.0, 0.2, 0.7, 0.1]])
    >>> drop_and_grow(mask, w.abs(), g.abs(), "unstructured", drop_fraction=0.34).mask.int().tolist()
    [[1, 0, 1, 0, 1, 0]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparseforge.errors import ConfigError
from sparseforge.masks import mask_from_scores
from sparseforge.patterns import NM, Block, Channel, FanIn, Pattern, Unstructured, parse

__all__ = ["selection_pattern", "unit_layout", "random_mask", "prune_mask", "drop_and_grow", "DropGrow", "exclude_scores"]


def selection_pattern(pattern: "Pattern | str", method: str = "this method") -> Pattern:
    """The pattern used for intermediate selections: ``FanIn(k)`` becomes ``FanIn()`` (count from sparsity)."""
    pattern = parse(pattern)
    if isinstance(pattern, NM):
        raise ConfigError(
            f"{method} cannot use N:M pattern {pattern}: N:M fixes the sparsity of every group, so masks "
            "can neither ramp up nor drop and grow; use 'static' for a fixed random N:M mask, or an "
            "unstructured / block / fanin / channel pattern"
        )
    return FanIn() if isinstance(pattern, FanIn) else pattern


def unit_layout(pattern: Pattern, shape: tuple[int, int]) -> tuple[int, int, int]:
    """``(groups, units per group, weights per unit)`` of a (non-N:M) pattern on an ``(out, in)`` shape."""
    rows, cols = shape
    if isinstance(pattern, Unstructured):
        return 1, rows * cols, 1
    if isinstance(pattern, FanIn):
        return rows, cols, 1
    if isinstance(pattern, Block):
        return 1, (rows // pattern.h) * (cols // pattern.w), pattern.h * pattern.w
    if isinstance(pattern, Channel):
        return 1, rows, cols
    raise ConfigError(f"pattern {pattern} has no unit layout for sparse training")


def exclude_scores(scores: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """``scores`` (float32) with ``excluded`` entries set below every real score."""
    scores = scores.detach().float()
    low = min(float(scores.min()), 0.0) - 1.0 if scores.numel() else -1.0
    return scores.masked_fill(excluded, low)


def _active_units(mask: torch.Tensor, layout: tuple[int, int, int]) -> int:
    groups, _, unit = layout
    total = int(mask.sum())
    if total % (groups * unit):
        raise ConfigError(f"mask with {total} active weights does not consist of whole units ({groups} x {unit})")
    return total // (groups * unit)


def random_mask(
    shape: tuple[int, int], pattern: "Pattern | str", sparsity: float, generator: torch.Generator
) -> torch.Tensor:
    """A uniformly random mask of ``pattern`` at ``sparsity`` (SET / RigL initialisation, static sparse)."""
    scores = torch.rand(shape, generator=generator)  # (out, in), CPU: reproducible on any device
    return mask_from_scores(scores, pattern, sparsity)


def prune_mask(mask: torch.Tensor, scores: torch.Tensor, pattern: "Pattern | str", sparsity: float) -> torch.Tensor:
    """Gradual pruning step: keep the top ``scores`` among active weights, at ``sparsity`` (never regrows)."""
    sel = selection_pattern(pattern, "gradual pruning")
    new = mask_from_scores(exclude_scores(scores, ~mask), sel, sparsity)
    if bool((new & ~mask).any()):
        raise ConfigError(
            f"gradual pruning target sparsity {sparsity:g} is below the current sparsity "
            f"{1 - mask.float().mean().item():g}; the schedule must not decrease"
        )
    return new


@dataclass
class DropGrow:
    """One drop-and-grow update. ``kept``: active after the drop; ``grown``: the units selected by
    the grow scores (may include just-dropped ones, as in the paper); ``mask = kept | grown``."""

    mask: torch.Tensor
    kept: torch.Tensor
    grown: torch.Tensor
    units: int  # units dropped (= grown) per group


def drop_and_grow(
    mask: torch.Tensor,
    drop_scores: torch.Tensor,
    grow_scores: torch.Tensor,
    pattern: "Pattern | str",
    drop_fraction: float,
) -> DropGrow:
    """Drop ``k = floor(drop_fraction * active units)`` active units with the lowest ``drop_scores``,
    then grow the ``k`` units with the highest ``grow_scores`` among all units not kept (RigL
    Algorithm 1: ``ArgTopK_{i not in theta \\ I_drop}``, so a just-dropped unit may come back).
    The number of active units is unchanged."""
    if not 0.0 <= drop_fraction < 1.0:
        raise ConfigError(f"drop fraction must be in [0, 1), got {drop_fraction!r}")
    sel = selection_pattern(pattern, "dynamic sparse training")
    layout = unit_layout(sel, tuple(mask.shape))
    groups, length, unit = layout
    active = _active_units(mask, layout)
    k = math.floor(drop_fraction * active + 1e-9)
    if k == 0:
        return DropGrow(mask.clone(), mask.clone(), torch.zeros_like(mask), 0)
    kept = mask_from_scores(exclude_scores(drop_scores, ~mask), sel, (length - (active - k)) / length)
    grown = mask_from_scores(exclude_scores(grow_scores, kept), sel, (length - k) / length)
    if bool((kept & ~mask).any()) or int(kept.sum()) != (active - k) * groups * unit:
        raise RuntimeError("internal error: drop step kept an inactive unit or the wrong count")
    if bool((grown & kept).any()) or int(grown.sum()) != k * groups * unit:
        raise RuntimeError("internal error: grow step picked a kept unit or the wrong count")
    return DropGrow(kept | grown, kept, grown, k)
