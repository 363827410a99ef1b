"""``ActivationSparsityConfig``: what :func:`sparseforge.activation.sparsify_activations_` does.

Example:
    >>> from sparseforge.activation.config import ActivationSparsityConfig
    >>> cfg = ActivationSparsityConfig(method="teal", sparsity=0.5, allocation="greedy")
    >>> cfg.greedy_step
    0.05
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sparseforge.config import CalibrationConfig
from sparseforge.errors import ConfigError

__all__ = ["ActivationSparsityConfig", "METHODS", "ALLOCATIONS", "DISTRIBUTIONS"]

METHODS = ("teal", "cats", "rsparse")
ALLOCATIONS = ("uniform", "greedy")
DISTRIBUTIONS = ("signed", "abs")
RSPARSE_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)  # R-Sparse's per-layer rho candidates (default)


@dataclass
class ActivationSparsityConfig:
    """Activation sparsity for every projection inside the model's repeated blocks.

    Attributes:
        method: ``"teal"``: a magnitude threshold on the input of each projection, calibrated from
            the distribution of that input on calibration data. ``"cats"``: a threshold on the
            gate output of GLU MLPs (attention stays dense; uniform allocation only). ``"rsparse"``:
            R-Sparse, a threshold on ``|x| * ||W[:, i]||`` plus a low-rank SVD term for the skipped
            channels (:mod:`sparseforge.activation.rsparse`; uniform allocation only).
        sparsity: target fraction of skipped input channels in [0, 1). With ``"greedy"`` it is the
            block's *effective* sparsity, weighted by each projection's parameter count (bytes).
        allocation: ``"uniform"`` (every projection at ``sparsity``) or ``"greedy"`` (TEAL's
            block-wise greedy search: repeatedly raise the sparsity of the projection whose step
            hurts the block output least).
        distribution: ``"signed"`` = TEAL's threshold ``icdf(0.5 + s / 2)`` of the signed histogram
            (exact for a zero-mean symmetric input), ``"abs"`` = the ``s``-quantile of ``|x|``
            (exact for any distribution).
        greedy_step: base step of the greedy search; projection p moves by ``greedy_step / w_p``,
            ``w_p`` its parameter count relative to the block's first projection (TEAL: 0.05).
        greedy_last_fraction: the greedy error looks at this last fraction of positions (TEAL: 0.25).
        greedy_samples: calibration sequences the greedy search runs on (the histograms use all).
        targets: glob patterns of layer names to sparsify (``None``: every ``nn.Linear`` inside
            the repeated blocks; embeddings and lm_head are never included).
        ignore: glob patterns to leave dense.
        rsparse_ratio: R-Sparse's ``rho``: the share of each layer's byte budget ``(1 - sparsity)``
            spent on input channels, the rest on the rank of the SVD term (1 = no low-rank term).
            A list: each layer takes the candidate with the lowest output error on its calibration
            inputs (default; the paper searches per-layer recipes, its uniform baseline is 0.95).
        calibration: the calibration data (same sampling as :func:`sparseforge.sparsify_`).
    """

    method: str = "teal"
    sparsity: float = 0.5
    allocation: str = "uniform"
    distribution: str = "signed"
    greedy_step: float = 0.05
    greedy_last_fraction: float = 0.25
    greedy_samples: int = 8
    rsparse_ratio: "float | list[float]" = field(default_factory=lambda: list(RSPARSE_RATIOS))
    targets: Optional[list[str]] = None
    ignore: list[str] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"activation sparsity method {self.method!r} is not known; use one of {METHODS}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation {self.allocation!r} is not known; use one of {ALLOCATIONS}")
        if self.method in ("cats", "rsparse") and self.allocation != "uniform":
            raise ConfigError(f"{self.method} supports allocation='uniform' only")
        ratios = self.rsparse_ratio if isinstance(self.rsparse_ratio, (list, tuple)) else [self.rsparse_ratio]
        if not ratios or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0
                             for r in ratios):
            raise ConfigError(f"rsparse_ratio must be a number in [0, 1] or a list of them, got {self.rsparse_ratio!r}")
        if isinstance(self.rsparse_ratio, tuple):
            self.rsparse_ratio = list(self.rsparse_ratio)
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"distribution {self.distribution!r} is not known; use one of {DISTRIBUTIONS}")
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
            raise ConfigError(f"activation sparsity must be in [0, 1), got {s!r}; 0.4-0.5 is TEAL's range")
        self.sparsity = float(s)
        if not 0.0 < self.greedy_step <= 0.5:
            raise ConfigError(f"greedy_step must be in (0, 0.5], got {self.greedy_step!r}")
        if not 0.0 < self.greedy_last_fraction <= 1.0:
            raise ConfigError(f"greedy_last_fraction must be in (0, 1], got {self.greedy_last_fraction!r}")
        if isinstance(self.greedy_samples, bool) or not isinstance(self.greedy_samples, int) or self.greedy_samples < 1:
            raise ConfigError(f"greedy_samples must be a positive integer, got {self.greedy_samples!r}")
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig(**self.calibration)
