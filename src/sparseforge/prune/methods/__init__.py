"""One-shot pruning methods: magnitude, Wanda, SparseGPT and DSnoT (prune-and-grow on top of one).

Each method is a pure tensor function (``magnitude_scores``, ``wanda_scores``,
``sparsegpt_prune``) behind a thin :class:`~sparseforge.prune.methods.base.PruningMethod` class.
The model-level code uses only this interface:

    >>> import torch
    >>> from sparseforge.prune.methods import get_method, LayerStats
    >>> method = get_method("sparsegpt", {"blocksize": 64})
    >>> method.needs_calibration, method.needs_hessian
    (True, True)
    >>> stats = LayerStats(8, hessian=method.needs_hessian)
    >>> stats.add_batch(torch.randn(4, 16, 8))             # layer inputs (..., in_features)
    >>> result = method.prune(torch.randn(6, 8), stats, "unstructured", 0.5)
    >>> result.mask.logical_not().sum().item(), result.info["method"]
    (24, 'sparsegpt')
"""

from __future__ import annotations

from typing import Any

from sparseforge import config
from sparseforge.errors import ConfigError
from sparseforge.prune.methods.base import LayerStats, PruneResult, PruningMethod
from sparseforge.prune.methods.dsnot import DSnoTPruning, dsnot_update
from sparseforge.prune.methods.magnitude import MagnitudePruning, magnitude_scores
from sparseforge.prune.methods.sparsegpt import SparseGPTPruning, sparsegpt_prune
from sparseforge.prune.methods.wanda import WandaPruning, wanda_scores

__all__ = [
    "METHODS",
    "get_method",
    "LayerStats",
    "PruneResult",
    "PruningMethod",
    "MagnitudePruning",
    "WandaPruning",
    "SparseGPTPruning",
    "magnitude_scores",
    "wanda_scores",
    "sparsegpt_prune",
    "DSnoTPruning",
    "dsnot_update",
]

# explicit registry: name -> class, in the order of sparseforge.config.METHODS (each class names itself)
METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls for cls in (MagnitudePruning, WandaPruning, SparseGPTPruning, DSnoTPruning)
}
if tuple(METHODS) != config.METHODS:
    raise ImportError(f"sparseforge.config.METHODS {config.METHODS} and the method classes {tuple(METHODS)} disagree")


def get_method(name: str, options: "dict[str, Any] | None" = None) -> PruningMethod:
    """Instantiate method ``name`` with ``options``; :class:`ConfigError` names the valid choices."""
    cls = METHODS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}")
    return cls(options)
