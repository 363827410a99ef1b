"""Magnitude pruning: keep the weights with the largest ``|W_ij|``.

The classic data-free baseline (Han et al., 2015, "Learning both Weights and Connections for
Efficient Neural Networks"; Zhu & Gupta, 2017). Scores are compared across the whole layer
(``scope="layer"``, the default) or within each output row (``scope="row"``).

Example:
    >>> import torch
    >>> from sparseforge.prune.methods.magnitude import magnitude_scores, MagnitudePruning
    >>> magnitude_scores(torch.tensor([[1., -3.], [2., 0.5]])).tolist()
    [[1.0, 3.0], [2.0, 0.5]]
    >>> MagnitudePruning().prune(torch.tensor([[1., -3.], [2., 0.5]]), None, "unstructured", 0.5).weight.tolist()
    [[0.0, -3.0], [2.0, 0.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseforge.prune.methods.base import LayerStats, PruningMethod, check_scope

__all__ = ["magnitude_scores", "MagnitudePruning", "MagnitudeOptions"]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` as float32, shape (out, in)."""
    return weight.detach().float().abs()


@dataclass(frozen=True)
class MagnitudeOptions:
    scope: str = "layer"  # compare |W| across the whole layer ("layer") or per output row ("row")

    def __post_init__(self) -> None:
        check_scope(self.scope, "magnitude")


class MagnitudePruning(PruningMethod):
    """Keep the largest ``|W|``; needs no calibration data (``stats`` may be None)."""

    name = "magnitude"
    needs_calibration = False
    needs_hessian = False
    Options = MagnitudeOptions

    def scores(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        return magnitude_scores(weight)
