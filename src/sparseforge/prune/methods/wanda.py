"""Wanda: prune by weight magnitude times input activation norm (Sun et al., 2023).

"A Simple and Effective Pruning Approach for Large Language Models" (ICLR 2024). The score of
weight ``W_ij`` is ``|W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the L2 norm of input feature
``j`` over all calibration tokens. As in the paper, scores are compared within each output row
(``scope="row"``, the default); ``scope="layer"`` is the paper's per-layer ablation. No weight
update: the kept weights keep their values. Any uniform scaling of ``||X_j||`` (e.g. dividing
by the number of tokens, as the reference code does) leaves the mask unchanged.

Example:
    >>> import torch
    >>> from sparseforge.prune.methods.wanda import wanda_scores
    >>> w = torch.tensor([[1., -2.], [3., 1.]])
    >>> wanda_scores(w, torch.tensor([16., 1.])).tolist()   # ||X|| = (4, 1)
    [[4.0, 2.0], [12.0, 1.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseforge.errors import DataError
from sparseforge.prune.methods.base import LayerStats, PruningMethod, check_scope

__all__ = ["wanda_scores", "WandaPruning", "WandaOptions"]


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * sqrt(input_sq_norm_j)`` as float32, shape (out, in).

    ``input_sq_norm`` (in,) is ``||X_j||^2``, the per-input sum of squares over tokens.
    """
    if input_sq_norm.dim() != 1 or input_sq_norm.shape[0] != weight.shape[-1]:
        raise DataError(
            f"input_sq_norm must have shape ({weight.shape[-1]},) to match the weight {tuple(weight.shape)}, "
            f"got {tuple(input_sq_norm.shape)}"
        )
    if (input_sq_norm < 0).any():
        raise DataError("input_sq_norm holds squared norms and cannot be negative")
    norm = input_sq_norm.detach().float().sqrt().to(weight.device)  # (in,)
    return weight.detach().float().abs() * norm.unsqueeze(0)  # (out, in)


@dataclass(frozen=True)
class WandaOptions:
    scope: str = "row"  # the paper compares weights per output row; "layer" compares across the layer

    def __post_init__(self) -> None:
        check_scope(self.scope, "wanda")


class WandaPruning(PruningMethod):
    """Wanda (Sun et al., 2023): keep the largest ``|W| * ||X||``, per output row by default."""

    name = "wanda"
    needs_calibration = True
    needs_hessian = False
    Options = WandaOptions

    def scores(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        assert stats is not None  # checked by PruningMethod.prune
        return wanda_scores(weight, stats.input_sq_norm)
