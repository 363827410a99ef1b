"""``MoEConfig``: everything that shapes a :class:`~sparseforge.moe.MoE` layer, validated on creation.

``MoE(config)`` and ``MoE(d_model, d_hidden, num_experts, k, **options)`` build the same layer; the
fields are the keyword arguments documented on :class:`~sparseforge.moe.MoE`.

Example:
    >>> from sparseforge.moe import MoE, MoEConfig
    >>> cfg = MoEConfig(d_model=8, d_hidden=16, num_experts=4, k=2, capacity_factor=1.25)
    >>> MoE(cfg).capacity_factor
    1.25
    >>> MoEConfig(8, 16, 4, expert="moe")
    Traceback (most recent call last):
    ...
    sparseforge.errors.ConfigError: expert must be 'glu' or 'mlp', got 'moe'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparseforge.errors import ConfigError
from sparseforge.moe.bf16x3 import PRECISIONS
from sparseforge.moe.grouped import ACTIVATIONS, BACKENDS
from sparseforge.moe.routers import Router

__all__ = ["MoEConfig", "DECODE_BACKENDS"]

DECODE_BACKENDS = ("auto", "native", "torch")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass
class MoEConfig:
    """The options of a :class:`~sparseforge.moe.MoE` layer (see its docstring for each field)."""

    d_model: int
    d_hidden: int
    num_experts: int
    k: int = 2
    router: "str | Router" = "softmax_topk"
    router_options: dict | None = None
    expert: str = "glu"  # "glu" or "mlp"
    activation: str = "silu"
    shared_hidden: int | None = None  # None: no shared expert
    shared_gate: bool = False
    capacity_factor: float | None = None  # None: dropless
    input_jitter: float = 0.0
    lb_coef: float = 0.01
    z_coef: float = 0.001
    seed: int | None = None
    backend: str = "auto"  # expert matmuls: "auto" (= "loop"), "loop", "onednn" (opt-in private op)
    decode_backend: str = "auto"  # few-token forward: "auto", "native", "torch"
    decode_parallel: bool | None = None  # native decode kernel: None = measured, True = thread pool, False = caller
    matmul_precision: str = "fp32"  # expert matmuls of the grouped path: "fp32" or the opt-in "bf16x3" (AMX)

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "num_experts"):
            _positive_int(name, getattr(self, name))
        if self.expert not in ("glu", "mlp"):
            raise ConfigError(f"expert must be 'glu' or 'mlp', got {self.expert!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        c = self.capacity_factor
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0 or math.isinf(c)):
            raise ConfigError(
                f"capacity_factor must be a finite number > 0 (e.g. 1.25) or None for dropless routing, got {c!r}"
            )
        if not 0.0 <= self.input_jitter < 1.0:
            raise ConfigError(f"input_jitter must be in [0, 1), got {self.input_jitter!r}")
        if isinstance(self.router, Router):
            if self.router_options:
                raise ConfigError("router_options only apply to a router given by name")
            if self.router.num_experts != self.num_experts:
                raise ConfigError(f"router has {self.router.num_experts} experts but the layer has {self.num_experts}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown dispatch backend {self.backend!r}; choose one of {list(BACKENDS)}")
        if self.matmul_precision not in PRECISIONS:
            raise ConfigError(f"unknown matmul_precision {self.matmul_precision!r}; choose one of {list(PRECISIONS)}")
        if self.matmul_precision == "bf16x3" and self.backend == "onednn":
            raise ConfigError("matmul_precision='bf16x3' runs its own AMX kernel: leave backend='auto' (or 'loop')")
        if self.decode_backend not in DECODE_BACKENDS:
            raise ConfigError(f"unknown decode_backend {self.decode_backend!r}; choose one of {list(DECODE_BACKENDS)}")
        if not (self.decode_parallel is None or isinstance(self.decode_parallel, bool)):
            raise ConfigError(f"decode_parallel must be None (measure), True or False, got {self.decode_parallel!r}")
        if self.shared_hidden is not None:
            _positive_int("shared_hidden", self.shared_hidden)
        elif self.shared_gate:
            raise ConfigError("shared_gate=True needs a shared expert: set shared_hidden")
