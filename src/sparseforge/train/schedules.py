"""When masks change and by how much: the cubic sparsity ramp and the cosine drop fraction.

Steps are counted in optimizer steps: ``t = 1`` right after the first ``optimizer.step()``.

* **Cubic gradual pruning** (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1)::

      s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3     for t in {t0, t0 + dt, ..., t0 + n dt}

  with ``t0 = start_step``, ``dt = update_interval`` and ``t0 + n dt = end_step`` (so
  ``end_step - start_step`` must be a multiple of ``update_interval``). Pruning happens at those
  steps only; ``s_t = s_i`` before ``t0`` and ``s_f`` after the end.
* **Cosine drop fraction** (Evci et al. 2020, RigL, Sec. 3)::

      f(t) = alpha / 2 * (1 + cos(pi * (t - start_step) / (end_step - start_step)))

  RigL's paper writes ``cos(t pi / T_end)`` (training starts at 0); measuring from
  ``start_step`` makes the first update drop ``alpha`` for any start. Updates happen at
  ``start_step + k * update_interval`` for ``start_step <= t < end_step`` (``t >= 1``), as in the
  paper's ``t mod dT == 0 and t < T_end``.

Example:
    >>> from sparseforge.train.schedules import Schedule, cubic_sparsity, cosine_drop_fraction
    >>> s = Schedule(start_step=0, end_step=100, update_interval=25)
    >>> round(cubic_sparsity(50, s, initial=0.0, final=0.8), 6)  # 0.8 - 0.8 * 0.5**3
    0.7
    >>> round(cosine_drop_fraction(50, s, alpha=0.3), 6)  # halfway: alpha / 2
    0.15
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparseforge.errors import ConfigError

__all__ = ["Schedule", "cubic_sparsity", "cosine_drop_fraction", "constant_drop_fraction"]


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"schedule.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class Schedule:
    """Mask-update steps: every ``update_interval`` optimizer steps from ``start_step`` to ``end_step``.

    ``end_step=None`` is allowed only for methods that never update masks (static sparsity).
    """

    start_step: int = 0  # first step at which masks may change (Zhu & Gupta's t0)
    end_step: int | None = None  # GMP: last pruning step; DST: masks stop changing (RigL's T_end)
    update_interval: int = 100  # steps between mask updates (dt / Delta T)

    def __post_init__(self) -> None:
        _check_int("start_step", self.start_step, 0)
        _check_int("update_interval", self.update_interval, 1)
        if self.end_step is not None:
            _check_int("end_step", self.end_step, 1)
            if self.end_step <= self.start_step:
                raise ConfigError(
                    f"schedule ends before it starts: end_step={self.end_step} <= start_step={self.start_step}; "
                    "set end_step after start_step (e.g. 75% of the training steps)"
                )

    def require_end(self, method: str) -> int:
        if self.end_step is None:
            raise ConfigError(
                f"{method} needs schedule.end_step (the step after which masks stop changing; "
                "RigL uses 75% of training, GMP ends pruning before fine-tuning)"
            )
        return self.end_step

    def is_gradual_step(self, t: int) -> bool:
        """Pruning step of the cubic ramp: ``t0 <= t <= end`` on the ``dt`` grid (``t >= 1``)."""
        end = self.require_end("gradual pruning")
        return t >= 1 and self.start_step <= t <= end and (t - self.start_step) % self.update_interval == 0

    def is_dst_step(self, t: int) -> bool:
        """Drop-and-grow step: ``start <= t < end`` on the ``dt`` grid (``t >= 1``)."""
        end = self.require_end("dynamic sparse training")
        return t >= 1 and self.start_step <= t < end and (t - self.start_step) % self.update_interval == 0

    def check_gradual(self) -> None:
        """Zhu & Gupta's grid must land on ``end_step`` so the final sparsity is reached."""
        end = self.require_end("gradual pruning")
        if (end - self.start_step) % self.update_interval:
            raise ConfigError(
                f"gradual pruning needs end_step - start_step ({end} - {self.start_step}) to be a multiple of "
                f"update_interval={self.update_interval}, so the last pruning step reaches the final sparsity"
            )

    def check_dst(self) -> None:
        """At least one drop-and-grow step must exist."""
        end = self.require_end("dynamic sparse training")
        first = self.start_step if self.start_step >= 1 else self.update_interval
        if first >= end:
            raise ConfigError(
                f"schedule has no mask update: the first update step would be {first} but end_step={end}; "
                "lower update_interval or raise end_step"
            )


def cubic_sparsity(t: int, schedule: Schedule, initial: float, final: float) -> float:
    """Zhu & Gupta's ``s_t`` (clamped to ``initial`` before the start and ``final`` after the end)."""
    end = schedule.require_end("gradual pruning")
    if t <= schedule.start_step:
        return float(initial)
    if t >= end:
        return float(final)
    progress = (t - schedule.start_step) / (end - schedule.start_step)
    return final + (initial - final) * (1.0 - progress) ** 3


def cosine_drop_fraction(t: int, schedule: Schedule, alpha: float) -> float:
    """RigL's ``alpha / 2 * (1 + cos(pi * progress))``, 0 from ``end_step`` on."""
    end = schedule.require_end("dynamic sparse training")
    progress = min(max((t - schedule.start_step) / (end - schedule.start_step), 0.0), 1.0)
    return alpha / 2.0 * (1.0 + math.cos(math.pi * progress))


def constant_drop_fraction(t: int, schedule: Schedule, alpha: float) -> float:
    """SET's constant fraction ``alpha`` while updates run, 0 from ``end_step`` on."""
    end = schedule.require_end("dynamic sparse training")
    return float(alpha) if t < end else 0.0
