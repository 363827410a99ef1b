"""ProSparse's progressive L1 factor: a warm-up constant, then sine-shaped rises in stages.

ProSparse (Song et al. 2024, "ProSparse: Introducing and Enhancing Intrinsic Activation Sparsity
within Large Language Models", arXiv:2402.13516, Section 3.2) trains a ReLU-fied model on
``loss + lambda(t) * L1(activations)``, the factor rising in stages so that the activation
distribution never shifts abruptly. Stage ``i`` ends at the cumulative step ``T_i`` with the factor
``lambda_i``:

* stage 0 (warm-up), ``0 <= t <= T_0``: ``lambda = lambda_0`` (a small constant, often 0);
* stage ``i >= 1``, ``T_{i-1} < t <= T_i``:
  ``lambda = lambda_{i-1} + (lambda_i - lambda_{i-1}) * sin(pi / 2 * (t - T_{i-1}) / (T_i - T_{i-1}))``
  (a stage with ``lambda_i = lambda_{i-1}`` holds the factor constant);
* after the last stage: ``lambda_last``.

``t`` counts optimizer steps: the factor applied during the ``t``-th step is ``value(t)``, so the
``T_i``-th step runs at exactly ``lambda_i``. ProSparse-LLaMA-2-7B used stages with factors from
0 up to a few times 1e-1 over about 16k steps (model card); sizes that fit a small model are in
``benchmarks/bench_activation_relufy.py``.

Example:
    >>> from sparseforge.activation.l1_schedule import L1Schedule
    >>> s = L1Schedule([(0.0, 10), (1e-2, 20), (1e-2, 25), (5e-2, 35)])
    >>> s.value(10), round(s.value(15), 6), s.value(20), s.value(24), s.value(35), s.value(99)
    (0.0, 0.007071, 0.01, 0.01, 0.05, 0.05)
    >>> s.total_steps
    35
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from sparseforge.errors import ConfigError

__all__ = ["L1Schedule"]


class L1Schedule:
    """The stages ``[(lambda_0, T_0), (lambda_1, T_1), ...]`` (module doc): ``lambda_i`` finite, >= 0
    and non-decreasing; ``T_i`` integer cumulative steps, ``T_0 >= 0`` and strictly increasing."""

    def __init__(self, stages: Sequence[Sequence[Any]]) -> None:
        if isinstance(stages, L1Schedule):
            stages = stages.stages
        if not isinstance(stages, (list, tuple)) or not stages:
            raise ConfigError(f"l1_schedule must be a non-empty list of [factor, end step] stages, got {stages!r:.80}")
        parsed: list[tuple[float, int]] = []
        for i, stage in enumerate(stages):
            if not isinstance(stage, (list, tuple)) or len(stage) != 2:
                raise ConfigError(f"l1_schedule stage {i} must be [factor, end step], got {stage!r:.60}")
            lam, end = stage
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
                raise ConfigError(f"l1_schedule stage {i}: the factor must be a finite number >= 0, got {lam!r}")
            if isinstance(end, bool) or not isinstance(end, int) or end < 0:
                raise ConfigError(f"l1_schedule stage {i}: the end step must be an integer >= 0, got {end!r}")
            if parsed and end <= parsed[-1][1]:
                raise ConfigError(f"l1_schedule stage {i} ends at step {end}, not after stage {i - 1} "
                                  f"(step {parsed[-1][1]}); end steps are cumulative and increasing")
            if parsed and lam < parsed[-1][0]:
                raise ConfigError(f"l1_schedule stage {i}: the factor {lam:g} is below stage {i - 1}'s "
                                  f"{parsed[-1][0]:g}; the regularisation is progressive (non-decreasing)")
            parsed.append((float(lam), end))
        self.stages = parsed

    @classmethod
    def single(cls, peak: float, warmup: int) -> "L1Schedule":
        """One quarter-sine rise from 0 to ``peak`` over ``warmup`` steps, then ``peak``."""
        return cls([(0.0, 0), (peak, warmup)])

    @classmethod
    def even(cls, factors: Sequence[float], steps: int, warmup: int = 0) -> "L1Schedule":
        """A warm-up of ``warmup`` steps at factor 0, then one sine-shaped stage per factor, the
        remaining ``steps - warmup`` split evenly.

        Example:
            >>> L1Schedule.even([0.1, 0.5], steps=30, warmup=10).stages
            [(0.0, 10), (0.1, 20), (0.5, 30)]
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= warmup < steps:
            raise ConfigError(f"l1 schedule: need 0 <= warmup < steps, got warmup={warmup!r}, steps={steps!r}")
        factors = list(factors)
        if not factors or len(factors) > steps - warmup:
            raise ConfigError(f"l1 schedule: {len(factors)} factor(s) need 1 to {steps - warmup} steps each after the warm-up")
        ends = [warmup + round((steps - warmup) * (i + 1) / len(factors)) for i in range(len(factors))]
        return cls([(0.0, warmup)] + list(zip(factors, ends)))

    @property
    def total_steps(self) -> int:
        """``T`` of the last stage: the step from which the factor stays at its final value."""
        return self.stages[-1][1]

    def value(self, step: int) -> float:
        """The factor during optimizer step ``step`` (1-based; 0 = before training)."""
        lam0, t0 = self.stages[0]
        if step <= t0:
            return lam0
        for (lo, start), (hi, end) in zip(self.stages, self.stages[1:]):
            if step <= end:
                return lo + (hi - lo) * math.sin(0.5 * math.pi * (step - start) / (end - start))
        return self.stages[-1][0]

    def to_list(self) -> list[list[float]]:
        """The stages as a JSON / YAML list ``[[factor, end step], ...]``."""
        return [[lam, end] for lam, end in self.stages]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, L1Schedule) and self.stages == other.stages

    def __repr__(self) -> str:
        return f"L1Schedule({self.stages!r})"
