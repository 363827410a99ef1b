"""Calibration pieces shared by the activation-sparsity methods: TEAL's activation histogram,
calibration batches, the finiteness check.

Example:
    >>> import torch
    >>> from sparseforge.activation.calibrate import Histogram
    >>> h = Histogram.of(torch.linspace(-1, 1, 100001))
    >>> round(h.icdf(0.75), 2)
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from sparseforge.config import CalibrationConfig
from sparseforge.errors import DataError, NumericalError

__all__ = ["Histogram", "calibration_batches", "check_finite", "NUM_BINS", "OUTLIER_FRACTION"]

NUM_BINS = 10_000
OUTLIER_FRACTION = 0.01


@dataclass
class Histogram:
    """TEAL's activation histogram: bin centers and cumulative counts (float64)."""

    centers: Tensor  # (bins,)
    cumulative: Tensor  # (bins,)

    @classmethod
    def of(cls, values: Tensor, bins: int = NUM_BINS, outlier: float = OUTLIER_FRACTION) -> "Histogram":
        """Histogram of all of ``values``: ``bins - 2`` equal bins between the ``outlier`` and
        ``1 - outlier`` quantiles, one bin from the minimum and one up to the maximum."""
        v = values.detach().reshape(-1).float()  # (n,)
        n = v.numel()
        if n == 0:
            raise DataError("no activations to build a histogram from")
        k = int(outlier * n)
        # TEAL sorts and reads sorted[k] and sorted[n - 1 - k]: the same order statistics
        lower, upper = torch.kthvalue(v, k + 1).values, torch.kthvalue(v, n - k).values
        edges = torch.linspace(float(lower), float(upper), bins - 1, dtype=torch.float64)
        if float(upper) <= float(lower):  # (near) constant input: one bin around the value
            edges = torch.tensor([float(lower) - 0.5, float(lower) + 0.5], dtype=torch.float64)
        lo, hi = float(v.min()), float(v.max())
        parts = [edges]
        if lo < float(edges[0]):
            parts.insert(0, torch.tensor([lo], dtype=torch.float64))
        if hi > float(edges[-1]):
            parts.append(torch.tensor([hi], dtype=torch.float64))
        edges = torch.cat(parts)
        counts, _ = torch.histogram(v.double(), bins=edges)  # (bins,)
        centers = (edges[:-1] + edges[1:]) / 2
        return cls(centers=centers, cumulative=torch.cumsum(counts, 0))

    def icdf(self, q: float) -> float:
        """The value below which a fraction ``q`` of the activations lies (TEAL's interpolation)."""
        total = float(self.cumulative[-1])
        target = q * total
        idx = int(torch.searchsorted(self.cumulative, torch.tensor([target], dtype=torch.float64))[0])
        if idx == 0:
            return float(self.centers[0])
        if idx >= self.centers.numel():
            return float(self.centers[-1])
        lo_c, hi_c = float(self.cumulative[idx - 1]), float(self.cumulative[idx])
        frac = (target - lo_c) / (hi_c - lo_c)
        lo_v, hi_v = float(self.centers[idx - 1]), float(self.centers[idx])
        return lo_v + frac * (hi_v - lo_v)

    def threshold(self, sparsity: float, signed: bool = True) -> float:
        """Threshold giving ``sparsity``: ``icdf(0.5 + s / 2)`` (signed histogram) or ``icdf(s)``
        (histogram of ``|x|``); 0 for sparsity 0."""
        if sparsity <= 0.0:
            return 0.0
        return max(0.0, self.icdf(0.5 + sparsity / 2 if signed else sparsity))


def calibration_batches(cfg: CalibrationConfig, calibration: Optional[Tensor], tokenizer, method: str) -> list[Tensor]:
    """Calibration token ids split into batches: ``calibration`` (samples, seqlen) as given, or
    drawn by ``cfg`` with ``tokenizer`` (as :func:`sparseforge.sparsify_` does)."""
    if calibration is None:
        if tokenizer is None:
            raise DataError(f"{method} needs calibration data: pass tokenizer= (to draw "
                            f"{cfg.samples} samples from {cfg.source!r}) or calibration= token ids")
        from sparseforge.data.calibration import calibration_tokens

        calibration = calibration_tokens(tokenizer, cfg)
    if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        raise DataError("calibration must be a non-empty LongTensor of token ids shaped (samples, seqlen)")
    if calibration.shape[1] < 2:
        raise DataError(f"calibration sequences need at least 2 tokens, got {calibration.shape[1]}")
    return list(calibration.long().split(cfg.batch_size))


def check_finite(name: str, xs: list[Tensor]) -> None:
    for x in xs:
        if not torch.isfinite(x).all():
            raise NumericalError(f"layer {name} received NaN/inf activations during calibration; check the model "
                                 "weights and the calibration data (a float16 overflow?)")
