"""Layer-wise sparsity allocation: OWL, Outlier Weighed Layerwise sparsity (Yin et al., 2024).

"Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High
Sparsity" (ICML 2024). A transformer block whose Wanda metric ``A_ij = |W_ij| * ||X_j||_2`` has
many *outliers* (entries above ``threshold`` times the mean; the paper's M, default 5; all
linear layers of the block pooled) is pruned less. With outlier ratios ``r_l`` (the paper's
layerwise outlier distribution, LOD) and target sparsity ``S``:

    a_l   = (r_l - min r) / (max r - min r)                 # in [0, 1]
    S_l   = S - lam * (a_l - mean a) / max_k |a_k - mean a|

so more outliers -> lower sparsity, ``mean(S_l) = S`` exactly and every ``S_l`` lies in
``[S - lam, S + lam]`` as the paper states (the block furthest from the mean sits at distance
exactly ``lam``). The reference code (luuyin/OWL) uses the slope ``2 lam`` instead of
``lam / max|a - mean a|``: both agree when the ratios are symmetric about their mean; for
skewed ratios the reference leaves ``[S - lam, S + lam]`` (up to ``2 lam`` away from ``S``).

Example:
    >>> from sparseforge.prune.allocation import owl_sparsities
    >>> [round(s, 3) for s in owl_sparsities([0.01, 0.03, 0.02], sparsity=0.7, lam=0.08)]
    [0.78, 0.62, 0.7]
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from sparseforge.errors import ConfigError, DataError, NumericalError
from sparseforge.masks import resolve_sparsity
from sparseforge.patterns import Unstructured

__all__ = ["wanda_metric", "outlier_ratio", "owl_sparsities"]


def wanda_metric(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``, (out, in) float32; ``input_sq_norm`` (in,) is ``||X_j||^2``."""
    from sparseforge.prune.methods.wanda import wanda_scores

    return wanda_scores(weight, input_sq_norm)


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ConfigError(f"OWL outlier threshold must be a positive number (the paper uses 5), got {threshold!r}")


def _ratio(metric: torch.Tensor, threshold: float) -> float:
    if metric.numel() == 0:
        raise DataError("OWL needs at least one weight to compute an outlier ratio")
    if not torch.isfinite(metric).all():
        raise NumericalError("OWL outlier metric contains NaN or inf; check the weights and calibration activations")
    return (metric > threshold * metric.mean()).double().mean().item()


def outlier_ratio(
    weight: "torch.Tensor | Sequence[torch.Tensor]",
    input_sq_norm: "torch.Tensor | Sequence[torch.Tensor]",
    threshold: float = 5.0,
) -> float:
    """Fraction of entries of ``|W| * ||X||`` above ``threshold`` times their mean, in [0, 1].

    ``weight`` (out, in) and ``input_sq_norm`` (in,) describe one layer. To get a transformer
    block's ratio as the OWL reference code does, pass lists with one entry per linear layer of
    the block: their metrics are pooled, so one mean (and one threshold) serves the whole block.
    """
    _check_threshold(threshold)
    if isinstance(weight, torch.Tensor) != isinstance(input_sq_norm, torch.Tensor):
        raise DataError("outlier_ratio takes one weight and one input_sq_norm, or two lists of equal length")
    if isinstance(weight, torch.Tensor):
        return _ratio(wanda_metric(weight, input_sq_norm), threshold)
    weights, norms = list(weight), list(input_sq_norm)
    if len(weights) != len(norms) or not weights:
        raise DataError(
            f"outlier_ratio needs as many input_sq_norm as weights (at least one), got {len(weights)} and {len(norms)}"
        )
    pooled = [wanda_metric(w, n).flatten().cpu() for w, n in zip(weights, norms)]
    return _ratio(torch.cat(pooled), threshold)


def owl_sparsities(block_outlier_ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities in ``[sparsity - lam, sparsity + lam]`` with mean ``sparsity``.

    See the module doc for the formula. Raises :class:`ConfigError` when an input is invalid or a
    resulting sparsity falls outside [0, 1) (then lower ``lam``).
    """
    sparsity = resolve_sparsity(Unstructured(), sparsity)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam < 1.0:
        raise ConfigError(f"OWL lambda must be a number in [0, 1) (the paper uses 0.02-0.1), got {lam!r}")
    ratios = [float(r) for r in block_outlier_ratios]
    if not ratios:
        raise ConfigError("OWL needs the outlier ratio of at least one block")
    if not all(math.isfinite(r) and r >= 0 for r in ratios):
        raise ConfigError(f"OWL outlier ratios must be finite and non-negative, got {ratios}")
    lo, hi = min(ratios), max(ratios)
    if hi == lo or lam == 0:
        return [sparsity] * len(ratios)
    a = [(r - lo) / (hi - lo) for r in ratios]  # in [0, 1]
    mean_a = math.fsum(a) / len(a)
    dev = [x - mean_a for x in a]
    slope = lam / max(abs(d) for d in dev)
    out = [sparsity - slope * d for d in dev]
    # lam == sparsity puts the most outlier-rich block exactly at 0, which round-off can push to -1e-17
    out = [0.0 if -1e-12 < s < 0.0 else s for s in out]
    bad = [s for s in out if not 0.0 <= s < 1.0]
    if bad:
        raise ConfigError(
            f"OWL with sparsity={sparsity:g} and lambda={lam:g} gives block sparsities {bad} outside [0, 1); "
            f"choose owl_lambda <= {sparsity:g} and < {1.0 - sparsity:g}"
        )
    return out
