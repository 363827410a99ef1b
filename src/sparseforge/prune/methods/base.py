"""Shared bookkeeping of the one-shot pruning methods: calibration statistics, results, options.

A method is a small class around a pure tensor function. The base class owns everything that is
not the method's own math: checking the weight, the pattern and the sparsity, checking that the
calibration statistics fit, building options from a config, and reporting the achieved sparsity.

* :class:`LayerStats` accumulates what the calibration pass sees at one linear layer's input:
  the token count, the per-input sum of squares ``||X_j||^2`` (Wanda, OWL) and optionally the
  Hessian ``H = 2 X^T X / n`` of the layer-wise reconstruction loss (SparseGPT).
* :class:`PruningMethod` is the base class: subclasses set ``name``, ``needs_calibration``,
  ``needs_hessian``, an ``Options`` dataclass, and implement ``_prune`` (or only ``scores``).
* :class:`PruneResult` is what ``prune`` returns: pruned weight, keep-mask and diagnostics.

Example:
    >>> import torch
    >>> from sparseforge.prune.methods import LayerStats, get_method
    >>> method = get_method("wanda")
    >>> stats = LayerStats(4, hessian=method.needs_hessian)
    >>> stats.add_batch(torch.randn(2, 8, 4))   # (batch, tokens, in_features)
    >>> stats.num_tokens
    16
    >>> result = method.prune(torch.randn(3, 4), stats, "2:4", None)
    >>> result.mask.sum().item()
    6
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from sparseforge.errors import ConfigError, DataError, ModelError, NumericalError
from sparseforge.masks import mask_from_scores, resolve_sparsity
from sparseforge.patterns import Pattern, check_fits, parse

__all__ = ["LayerStats", "PruneResult", "PruningMethod", "build_options"]


class LayerStats:
    """Running statistics of one linear layer's inputs ``x`` of shape ``(..., in_features)``.

    Attributes:
        num_tokens: number of input vectors (tokens) seen so far.
        input_sq_norm: ``(in,)`` float32, ``sum_t x_tj^2`` = ``||X_j||^2`` per input feature
            (accumulated in float64, returned as float32).
        hessian: ``(in, in)`` float32, ``2 X^T X / n`` as a running average over tokens (only with
            ``hessian=True``). float32 halves the memory of the largest buffer (an 11008-wide layer
            needs 485 MB); SparseGPT factorizes it in float64 anyway.

    The buffers live on the device of the first batch (or ``device`` if given).
    """

    def __init__(self, in_features: int, hessian: bool = False, device: "torch.device | str | None" = None) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ConfigError(f"LayerStats needs a positive integer in_features, got {in_features!r}")
        self.in_features = in_features
        self.track_hessian = bool(hessian)
        self.num_tokens = 0
        self._device = None if device is None else torch.device(device)
        self._sq_sum: torch.Tensor | None = None  # (in,) float64
        self._hessian: torch.Tensor | None = None  # (in, in) float32

    def _allocate(self, device: torch.device) -> None:
        self._device = device if self._device is None else self._device
        self._sq_sum = torch.zeros(self.in_features, dtype=torch.float64, device=self._device)
        if self.track_hessian:
            self._hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self._device)

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add layer inputs ``x`` of shape ``(..., in_features)`` (any float dtype)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise DataError(f"calibration inputs must be a floating-point tensor, got {type(x).__name__}"
                            f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise DataError(
                f"calibration inputs have shape {tuple(x.shape)} but the layer has in_features="
                f"{self.in_features}; the last dimension must be the layer's input features"
            )
        x = x.reshape(-1, self.in_features)  # (n, in)
        n = x.shape[0]
        if n == 0:
            return
        if not torch.isfinite(x).all():
            raise NumericalError("calibration activations contain NaN or inf; check the model and its inputs")
        if self._sq_sum is None:
            self._allocate(x.device)
        x = x.to(self._device)
        self._sq_sum += x.double().pow(2).sum(0)
        if self._hessian is not None:
            xf = x.float()
            total = self.num_tokens + n
            # H <- H * n_old/total + (2/total) x^T x: the running mean of 2 x x^T over tokens
            self._hessian.addmm_(xf.T, xf, beta=self.num_tokens / total, alpha=2.0 / total)
        self.num_tokens += n

    @property
    def input_sq_norm(self) -> torch.Tensor:
        """``(in,)`` float32 squared L2 norm of each input feature over all tokens seen."""
        if self._sq_sum is None:
            raise DataError("no calibration inputs were recorded for this layer; run the calibration pass first")
        return self._sq_sum.float()

    @property
    def hessian(self) -> torch.Tensor:
        """``(in, in)`` float32 ``2 X^T X / n`` (a view of the accumulator; clone before editing)."""
        if not self.track_hessian:
            raise ConfigError("this LayerStats does not track the Hessian; create it with hessian=True")
        if self._hessian is None:
            raise DataError("no calibration inputs were recorded for this layer; run the calibration pass first")
        return self._hessian

    def __repr__(self) -> str:
        return f"LayerStats(in_features={self.in_features}, hessian={self.track_hessian}, num_tokens={self.num_tokens})"


@dataclass
class PruneResult:
    """Output of :meth:`PruningMethod.prune`.

    ``weight`` (out, in) float32 is zero wherever ``mask`` (out, in) bool is False; ``info`` holds
    diagnostics (always ``method``, ``pattern``, ``sparsity`` asked and ``achieved_sparsity``).
    """

    weight: torch.Tensor
    mask: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


def build_options(options_cls: type, options: "dict[str, Any] | None", method: str) -> Any:
    """Build ``options_cls`` from a dict; :class:`ConfigError` lists the valid keys on a bad one."""
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ConfigError(f"method_options for {method} must be a mapping, got {type(options).__name__}")
    valid = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none (this method takes no options)"
        raise ConfigError(f"unknown method_options {unknown} for method {method!r}; valid options: {listed}")
    return options_cls(**options)


def check_scope(scope: Any, method: str) -> None:
    if scope not in ("layer", "row"):
        raise ConfigError(f"{method} option scope must be 'layer' or 'row', got {scope!r}")


class PruningMethod:
    """Base class: validation and bookkeeping around a method's pure tensor function.

    Subclasses either implement ``scores(weight, stats)`` (score-based methods: the mask is
    ``mask_from_scores(scores, pattern, sparsity, scope=self.scope)``) or override ``_prune``.
    """

    name: ClassVar[str] = "base"
    needs_calibration: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: "dict[str, Any] | None" = None) -> None:
        self.options = build_options(self.Options, options, self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    @property
    def scope(self) -> str:
        return getattr(self.options, "scope", "layer")

    def scores(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _prune(
        self, weight: torch.Tensor, stats: LayerStats | None, pattern: Pattern, sparsity: float
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        mask = mask_from_scores(self.scores(weight, stats), pattern, sparsity, scope=self.scope)  # (out, in)
        return weight.masked_fill(~mask, 0.0), mask, {"scope": self.scope}

    @torch.no_grad()
    def prune(
        self,
        weight: torch.Tensor,
        stats: LayerStats | None,
        pattern: "Pattern | str",
        sparsity: float | None,
    ) -> PruneResult:
        """Prune ``weight`` (out, in) to ``pattern`` at ``sparsity``; ``weight`` is not modified."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ModelError(f"{self.name} prunes 2-D floating-point weights (out_features, in_features), got {shape}")
        pattern = parse(pattern)
        rows, cols = weight.shape
        check_fits(pattern, (rows, cols))
        sparsity = resolve_sparsity(pattern, sparsity, cols)
        if not torch.isfinite(weight).all():
            raise NumericalError(f"{self.name}: the weight contains NaN or inf; the model is broken before pruning")
        if self.needs_calibration:
            self._check_stats(stats, cols)
        w = weight.detach().float().clone()  # (out, in), never the caller's storage
        new_weight, mask, info = self._prune(w, stats, pattern, sparsity)
        info = {
            "method": self.name,
            "pattern": str(pattern),
            "sparsity": sparsity,
            "achieved_sparsity": 1.0 - mask.sum().item() / mask.numel() if mask.numel() else 0.0,
            **info,
        }
        return PruneResult(weight=new_weight, mask=mask, info=info)

    def _check_stats(self, stats: LayerStats | None, cols: int) -> None:
        if not isinstance(stats, LayerStats):
            raise DataError(f"{self.name} needs calibration statistics (a LayerStats), got {type(stats).__name__}")
        if stats.in_features != cols:
            raise DataError(f"calibration statistics have in_features={stats.in_features}, the weight has {cols}")
        if stats.num_tokens == 0:
            raise DataError(f"{self.name} needs calibration data but no tokens reached this layer; "
                            "check the calibration settings (samples, seqlen)")
        if self.needs_hessian and not stats.track_hessian:
            raise DataError(f"{self.name} needs the Hessian; create the stats with "
                            "LayerStats(in_features, hessian=method.needs_hessian)")
