"""Dataclass configs of the sparse-training methods, and their YAML recipes.

One config class per method, serialisable like :class:`sparseforge.config.SparsifyConfig`
(``to_dict`` / ``from_dict``, unknown keys rejected, values validated on construction).

Example:
    >>> from sparseforge.train.config import RigLConfig, dump_train_recipe, parse_train_recipe
    >>> cfg = RigLConfig(sparsity=0.9, distribution="erk", schedule={"end_step": 750, "update_interval": 100})
    >>> cfg.schedule.end_step
    750
    >>> parse_train_recipe(dump_train_recipe(cfg)) == cfg
    True

Recipe layout (``version`` guards future changes)::

    version: 1
    train:
      method: rigl
      sparsity: 0.9
      distribution: erk
      schedule: {start_step: 0, end_step: 750, update_interval: 100}
      drop_fraction: 0.3
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sparseforge.config import build_config
from sparseforge.errors import ConfigError
from sparseforge.patterns import DEFAULT_NM, NM, FanIn, Pattern, parse
from sparseforge.train.density import DISTRIBUTIONS
from sparseforge.train.schedules import Schedule
from sparseforge.train.updates import selection_pattern

__all__ = [
    "SparseTrainConfig",
    "StaticConfig",
    "GMPConfig",
    "SETConfig",
    "RigLConfig",
    "STEConfig",
    "SRSTEConfig",
    "SSTEConfig",
    "SRigLConfig",
    "SparseMomentumConfig",
    "TRAIN_CONFIGS",
    "TRAIN_RECIPE_VERSION",
    "parse_train_recipe",
    "load_train_recipe",
    "dump_train_recipe",
]

TRAIN_RECIPE_VERSION = 1
DROP_DECAYS = ("cosine", "constant")


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ConfigError(f"{name} must be a number in [{low:g}, {high:g}), got {value!r}")
    return float(value)


@dataclass
class SparseTrainConfig:
    """Fields every sparse-training method shares.

    Attributes:
        sparsity: target fraction of zeros over the sparsified layers, in [0, 1); required,
            except for patterns that fix it (N:M, ``fanin16``), where it stays ``None``.
        pattern: pattern string (``"unstructured"``, ``"block4x4"``, ``"fanin"``, ``"channel"``,
            ``"2:4"`` for static masks only).
        distribution: layer-wise sparsity: ``"uniform"``, ``"er"`` or ``"erk"``
            (see :mod:`sparseforge.train.density`).
        targets: module-name patterns (glob or ``"re:<regex>"``) of the linear layers to make
            sparse; ``None`` = every linear layer of the model.
        ignore: module-name patterns left dense (wins over ``targets``).
        dense_first: keep the first selected layer (module order) dense.
        dense_last: keep the last selected layer (module order) dense.
        seed: seed of the random masks (initialisation, SET regrowth).
        schedule: mask-update steps (:class:`~sparseforge.train.schedules.Schedule`); static
            sparsity never updates and ignores it.
    """

    method: ClassVar[str] = ""

    sparsity: float | None = None  # required unless the pattern fixes it
    pattern: str = "unstructured"
    distribution: str = "uniform"
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    dense_first: bool = False
    dense_last: bool = False
    seed: int = 0
    schedule: Schedule = field(default_factory=Schedule)

    def __post_init__(self) -> None:
        self.pattern = str(parse(self.pattern))
        pattern = self.pattern_value
        fixed = isinstance(pattern, NM) or (isinstance(pattern, FanIn) and pattern.k is not None)
        if fixed:
            if self.sparsity is not None and not (isinstance(pattern, NM) and abs(self.sparsity - pattern.sparsity) < 1e-9):
                raise ConfigError(f"pattern {pattern} fixes the sparsity; leave sparsity unset (None)")
            if self.distribution != "uniform":
                raise ConfigError(f"pattern {pattern} fixes every layer's sparsity; use distribution 'uniform'")
            self.sparsity = None
        elif self.sparsity is None:
            raise ConfigError(f"pattern {pattern} needs a sparsity in [0, 1), e.g. sparsity=0.9")
        else:
            self.sparsity = _number("sparsity", self.sparsity, 0.0, 1.0)
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"unknown distribution {self.distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
        if isinstance(self.targets, str) or isinstance(self.ignore, str):
            raise ConfigError("targets and ignore are lists of module-name patterns, e.g. ['*.mlp.*']")
        for name in ("dense_first", "dense_last"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.schedule, dict):
            self.schedule = build_config(Schedule, self.schedule, "schedule")
        if not isinstance(self.schedule, Schedule):
            raise ConfigError(f"schedule must be a mapping or Schedule, got {type(self.schedule).__name__}")

    @property
    def pattern_value(self) -> Pattern:
        return parse(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseTrainConfig":
        """Build the config of ``data["method"]`` (or of ``cls`` when called on a method class)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a training config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", cls.method or None)
        if method not in TRAIN_CONFIGS:
            raise ConfigError(f"unknown training method {method!r}; choose one of {', '.join(TRAIN_CONFIGS)}")
        target = TRAIN_CONFIGS[method]
        if cls.method and target is not cls:
            raise ConfigError(f"{cls.__name__} got method {method!r}")
        return build_config(target, data, f"{method} config")


@dataclass
class StaticConfig(SparseTrainConfig):
    """Static random sparsity: a random mask at step 0, never changed (any pattern, N:M included)."""

    method: ClassVar[str] = "static"


@dataclass
class GMPConfig(SparseTrainConfig):
    """Gradual magnitude pruning (Zhu & Gupta 2017): dense start, cubic ramp to ``sparsity``."""

    method: ClassVar[str] = "gmp"
    initial_sparsity: float = 0.0  # s_i, reached at schedule.start_step

    def __post_init__(self) -> None:
        super().__post_init__()
        selection_pattern(self.pattern_value, "gradual magnitude pruning")
        self.initial_sparsity = _number("initial_sparsity", self.initial_sparsity, 0.0, 1.0)
        if self.sparsity is not None and self.initial_sparsity > self.sparsity:
            raise ConfigError(
                f"initial_sparsity={self.initial_sparsity:g} exceeds the final sparsity={self.sparsity:g}; "
                "gradual pruning only removes weights"
            )
        self.schedule.check_gradual()


@dataclass
class SETConfig(SparseTrainConfig):
    """SET (Mocanu et al. 2018): drop the smallest ``|w|``, regrow at random."""

    method: ClassVar[str] = "set"
    drop_fraction: float = 0.3  # alpha: fraction of active weights dropped at an update
    drop_fraction_decay: str = "constant"  # "constant" (SET paper) or "cosine" (RigL)

    def __post_init__(self) -> None:
        super().__post_init__()
        selection_pattern(self.pattern_value, f"{self.method.upper()} (dynamic sparse training)")
        self.drop_fraction = _number("drop_fraction", self.drop_fraction, 0.0, 1.0)
        if self.drop_fraction_decay not in DROP_DECAYS:
            raise ConfigError(
                f"unknown drop_fraction_decay {self.drop_fraction_decay!r}; choose one of {', '.join(DROP_DECAYS)}"
            )
        self.schedule.check_dst()


@dataclass
class RigLConfig(SETConfig):
    """RigL (Evci et al. 2020): drop the smallest ``|w|``, grow the largest dense ``|grad|``."""

    method: ClassVar[str] = "rigl"
    drop_fraction_decay: str = "cosine"


FLOW_DECAYS = ("none", "linear", "exp")
STRUCTURE_DECAYS = ("none", "stepwise", "geometric")


@dataclass
class STEConfig(SparseTrainConfig):
    """N:M training with the straight-through estimator: the mask is recomputed from ``|w|`` every step.

    ``flow_decay`` / ``flow_decay_coef`` / ``flow_decay_start``: progressive gradient flow (MDGF of
    Bambhaniya et al. 2024), the forward uses ``w * (m + beta_t * (1 - m))`` with ``beta_t = 1``
    before ``flow_decay_start`` and ``max(0, 1 - coef * dt)`` (linear) or ``exp(-coef * dt)`` (exp)
    after it. ``structure_decay`` / ``structure_decay_start`` / ``structure_decay_end`` /
    ``structure_decay_levels``: SDGF of the same paper, the N:M pattern steps from dense to the target
    (``stepwise``: 7:8 -> 4:8 -> 2:8 -> 1:8; ``geometric``: 8:64 -> 4:32 -> 2:16 -> 1:8), see
    :func:`sparseforge.train.nm.structure_schedule`. ``transposable``: masks N:M along both the inputs and
    the outputs (``masks.transposable_mask``).
    """

    method: ClassVar[str] = "ste"
    pattern: str = str(DEFAULT_NM)
    flow_decay: str = "none"  # "none", "linear" or "exp" (MDGF)
    flow_decay_coef: float = 0.0  # k of beta_t = max(0, 1 - k dt) or exp(-k dt); > 0 when flow_decay is set
    flow_decay_start: int = 0  # optimizer step at which beta starts to decay (dense forward before it)
    transposable: bool = False  # N:M for W and W^T (4x4-block exact search)
    structure_decay: str = "none"  # "none", "stepwise" or "geometric" (SDGF)
    structure_decay_start: int = 0  # optimizer step: dense before it, then the SDGF patterns
    structure_decay_end: int = 0  # optimizer step from which the target pattern holds (> start when set)
    structure_decay_levels: int = 3  # geometric: first pattern (N 2^L):(M 2^L)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.pattern_value, NM):
            raise ConfigError(
                f"{self.method.upper()} trains N:M masks; pattern {self.pattern} is not N:M (use e.g. '2:4' or '1:4')"
            )
        if self.flow_decay not in FLOW_DECAYS:
            raise ConfigError(f"unknown flow_decay {self.flow_decay!r}; choose one of {', '.join(FLOW_DECAYS)}")
        self.flow_decay_coef = _number("flow_decay_coef", self.flow_decay_coef, 0.0, float("inf"))
        if self.flow_decay != "none" and self.flow_decay_coef <= 0:
            raise ConfigError(f"flow_decay {self.flow_decay!r} needs flow_decay_coef > 0, e.g. 1e-3")
        if isinstance(self.flow_decay_start, bool) or not isinstance(self.flow_decay_start, int) or self.flow_decay_start < 0:
            raise ConfigError(f"flow_decay_start must be an integer >= 0, got {self.flow_decay_start!r}")
        if not isinstance(self.transposable, bool):
            raise ConfigError(f"transposable must be true or false, got {self.transposable!r}")
        if self.structure_decay not in STRUCTURE_DECAYS:
            raise ConfigError(f"unknown structure_decay {self.structure_decay!r}; choose one of {', '.join(STRUCTURE_DECAYS)}")
        for name in ("structure_decay_start", "structure_decay_end", "structure_decay_levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.structure_decay != "none":
            if self.structure_decay_end <= self.structure_decay_start:
                raise ConfigError(f"structure_decay {self.structure_decay!r} needs structure_decay_end > structure_decay_start "
                                  f"(got {self.structure_decay_start} .. {self.structure_decay_end}): the patterns share those steps")
            if self.structure_decay == "geometric" and not 1 <= self.structure_decay_levels <= 6:
                raise ConfigError(f"structure_decay_levels must be 1..6, got {self.structure_decay_levels}")
            if self.transposable:
                raise ConfigError("structure_decay steps through patterns that transposable masks do not support; "
                                  "use one of them")


@dataclass
class SRSTEConfig(STEConfig):
    """SR-STE (Zhou et al. 2021): STE plus the sparse-refined decay ``decay * (~mask) * w`` on the gradient."""

    method: ClassVar[str] = "srste"
    decay: float = 2e-4  # lambda_W of the paper

    def __post_init__(self) -> None:
        super().__post_init__()
        self.decay = _number("decay", self.decay, 0.0, float("inf"))


@dataclass
class SRigLConfig(RigLConfig):
    """Structured RigL (Lasby et al. 2023): RigL under constant fan-in, with neuron ablation."""

    method: ClassVar[str] = "srigl"
    pattern: str = "fanin"
    gamma_sal: float = 0.3  # ablate a neuron with fewer than gamma_sal * fan-in salient weights (0: never)
    ablate_last: bool = False  # the last sparsified layer's neurons are outputs (classes, logits): keep them

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.pattern_value, FanIn):
            raise ConfigError(f"Structured RigL trains constant fan-in masks; use pattern 'fanin' (got {self.pattern})")
        self.gamma_sal = _number("gamma_sal", self.gamma_sal, 0.0, 1.0 + 1e-12)
        if not isinstance(self.ablate_last, bool):
            raise ConfigError(f"ablate_last must be true or false, got {self.ablate_last!r}")


@dataclass
class SparseMomentumConfig(SETConfig):
    """Sparse momentum (Dettmers & Zettlemoyer 2019): magnitude prune, momentum redistribution and growth."""

    method: ClassVar[str] = "sparse_momentum"
    drop_fraction: float = 0.5  # the paper's prune rate p
    drop_fraction_decay: str = "cosine"
    momentum: float = 0.9  # smoothing of the dense-gradient momentum that scores layers and zero weights

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.pattern_value) != "unstructured":
            raise ConfigError(
                f"sparse momentum moves weights between layers, which only an unstructured pattern allows "
                f"(got {self.pattern}); use SET or RigL for structured patterns"
            )
        self.momentum = _number("momentum", self.momentum, 0.0, 1.0)


@dataclass
class SSTEConfig(STEConfig):
    """S-STE (Hu et al. 2024): continuous N:M soft-thresholding with a fixed per-tensor scale."""

    method: ClassVar[str] = "sste"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.flow_decay != "none":
            raise ConfigError("S-STE's pruning function is already continuous; flow_decay is for STE / SR-STE, "
                              "leave it 'none'")
        if self.structure_decay != "none":
            raise ConfigError("structure_decay is for STE / SR-STE; S-STE's continuous pruning function has no dense "
                              "phase to decay from, leave it 'none'")
        if self.transposable:
            raise ConfigError("S-STE soft-thresholds against the (N+1)-th largest |w| of each group, which a "
                              "transposable mask does not respect; use STE / SR-STE for transposable masks")


TRAIN_CONFIGS: dict[str, type[SparseTrainConfig]] = {
    "static": StaticConfig,
    "gmp": GMPConfig,
    "set": SETConfig,
    "rigl": RigLConfig,
    "ste": STEConfig,
    "srste": SRSTEConfig,
    "sste": SSTEConfig,
    "srigl": SRigLConfig,
    "sparse_momentum": SparseMomentumConfig,
}


def parse_train_recipe(text: str) -> SparseTrainConfig:
    """Parse training-recipe YAML (see the module doc) into a method config."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"training recipe is not valid YAML: {exc}") from exc
    if isinstance(data, dict) and "train" in data:
        version = data.get("version", TRAIN_RECIPE_VERSION)
        if version != TRAIN_RECIPE_VERSION:
            raise ConfigError(
                f"training recipe version {version!r} is not supported (this sparseforge reads version {TRAIN_RECIPE_VERSION})"
            )
        extra = sorted(set(data) - {"version", "train"})
        if extra:
            raise ConfigError(f"unknown top-level key(s) {extra}; a training recipe has 'version' and 'train'")
        data = data["train"]
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"a training recipe needs a 'method' ({', '.join(TRAIN_CONFIGS)})")
    return SparseTrainConfig.from_dict(data)


def load_train_recipe(path: "str | Path") -> SparseTrainConfig:
    from sparseforge.config import read_text_file

    return parse_train_recipe(read_text_file(path, "training recipe file"))


def dump_train_recipe(config: SparseTrainConfig) -> str:
    """YAML text that :func:`parse_train_recipe` reads back into an equal config."""
    import yaml

    return yaml.safe_dump({"version": TRAIN_RECIPE_VERSION, "train": config.to_dict()}, sort_keys=False)
