"""Dataclass configs and YAML recipes.

A :class:`SparsifyConfig` says *what* to prune (targets, ignore), *how* (method and its options),
to *which pattern* and *how much* (sparsity, per-layer allocation, overrides). A recipe is a YAML
file holding a list of them; the CLI builds the very same objects and calls the same
:func:`sparseforge.sparsify_`.

Example:
    >>> from sparseforge.config import SparsifyConfig, dump_recipe, parse_recipe
    >>> cfg = SparsifyConfig(method="wanda", pattern="2:4")
    >>> cfg.sparsity  # N:M fixes the sparsity
    0.5
    >>> parse_recipe(dump_recipe([cfg]))[0] == cfg
    True

Recipe layout (``version`` guards future changes)::

    version: 1
    stages:
      - method: sparsegpt
        pattern: "2:4"
        ignore: ["*.mlp.down_proj"]
        calibration: {samples: 64, seqlen: 256, seed: 0}
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparseforge.errors import ConfigError
from sparseforge.patterns import NM, FanIn, Pattern, Unstructured, parse

__all__ = [
    "CalibrationConfig",
    "QuantConfig",
    "SparsifyConfig",
    "RECIPE_VERSION",
    "parse_recipe",
    "load_recipe",
    "dump_recipe",
    "name_matches",
    "build_config",
    "read_text_file",
]

RECIPE_VERSION = 1
# the one list of one-shot methods and allocations (torch-free: the CLI's choices); each method class
# in sparseforge.prune.methods carries the same name
METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")
ALLOCATIONS = ("uniform", "owl")
QUANT_METHODS = ("rtn", "joint")  # round-to-nearest after pruning; joint = inside SparseGPT's OBS pass
QUANT_BITS = (8, 4)
DEFAULT_SPARSITY = 0.5


@dataclass
class CalibrationConfig:
    """Calibration data: ``samples`` windows of ``seqlen`` tokens drawn with ``seed``.

    ``source`` is ``"builtin"`` (the vendored Shakespeare train split) or a path to a UTF-8 text
    file or a directory of ``*.txt`` files.
    """

    source: str = "builtin"
    samples: int = 64  # number of calibration sequences
    seqlen: int = 256  # tokens per sequence
    seed: int = 0
    batch_size: int = 8  # sequences per forward pass while calibrating

    def __post_init__(self) -> None:
        for name in ("samples", "seqlen", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"calibration.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Symmetric per-channel (or per-group) weight quantization (see :mod:`sparseforge.quant`).

    Attributes:
        bits: 8 or 4.
        group_size: ``None`` for one scale per output channel, else the number of consecutive input
            columns sharing a scale (must divide ``in_features``; for ``method="joint"`` it must
            also divide SparseGPT's ``blocksize``).
        method: ``"rtn"`` (round to nearest, applied after pruning, any method) or ``"joint"``
            (quantize inside SparseGPT's column pass, each column's quantization error propagated to
            the remaining columns like the pruning error; Frantar & Alistarh 2023, section 3.4).
    """

    bits: int = 8
    group_size: int | None = None
    method: str = "rtn"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in QUANT_BITS:
            raise ConfigError(f"quantization bits must be 8 or 4, got {self.bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ConfigError(f"quantization group_size must be a positive integer or null, got {self.group_size!r}")
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; choose one of {', '.join(QUANT_METHODS)}")

    @property
    def qmax(self) -> int:
        """Largest code magnitude: codes lie in ``[-qmax, qmax]``."""
        return 2 ** (self.bits - 1) - 1

    def describe(self) -> str:
        """Short label, e.g. ``'int8 joint per-channel'``."""
        groups = "per-channel" if self.group_size is None else f"group {self.group_size}"
        return f"int{self.bits} {self.method} {groups}"


@dataclass
class SparsifyConfig:
    """One pruning pass over a model.

    Attributes:
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        pattern: pattern string (``"unstructured"``, ``"2:4"``, ``"block4x4"``, ``"fanin"``, ``"channel"``).
        sparsity: target fraction of zeros in [0, 1); ``None`` (default) takes the N:M pattern's own
            (``1 - N/M``), ``FanIn(k)``'s per layer, and 0.5 for every other pattern.
        targets: glob patterns (or ``"re:<regex>"``) of module names to prune; ``None`` = every
            linear layer inside the model's repeated transformer blocks.
        ignore: module-name patterns never pruned (takes precedence over ``targets``).
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"owl"`` (outlier-weighted
            layer-wise sparsity, Yin et al. 2024, same average).
        owl_lambda: OWL's maximum deviation of a block's sparsity from the average.
        owl_threshold: OWL's outlier threshold M (an outlier score exceeds M x the layer mean).
        overrides: ``{module-name pattern: sparsity}``, applied after allocation.
        method_options: method-specific options (e.g. SparseGPT ``blocksize``, ``dampening``).
        calibration: calibration data for methods that need it.
        quantize: quantize the pruned layers (:class:`~sparseforge.quant.QuantConfig`, or its mapping
            ``{bits: 8, group_size: null, method: joint}``): ``method="rtn"`` rounds after pruning (any
            method), ``"joint"`` quantizes inside SparseGPT's pass (``method="sparsegpt"`` only).
    """

    method: str = "sparsegpt"
    pattern: str = "unstructured"
    sparsity: float | None = None  # None: the N:M pattern's own, FanIn(k)'s per layer, else 0.5
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    overrides: dict[str, float] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantize: QuantConfig | None = None

    def __post_init__(self) -> None:
        from sparseforge.masks import resolve_sparsity  # torch: imported when a config is built, not with the module

        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        self.pattern = str(parse(self.pattern))
        pattern = self.pattern_value
        if self.sparsity is None and not isinstance(pattern, NM):
            if not (isinstance(pattern, FanIn) and pattern.k is not None):  # FanIn(k) fixes it per layer
                self.sparsity = DEFAULT_SPARSITY
        else:
            self.sparsity = resolve_sparsity(pattern, self.sparsity)
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if not 0.0 <= self.owl_lambda < 1.0:
            raise ConfigError(f"owl_lambda must be in [0, 1), got {self.owl_lambda!r}")
        if self.owl_threshold <= 0:
            raise ConfigError(f"owl_threshold must be positive, got {self.owl_threshold!r}")
        if isinstance(self.targets, str) or isinstance(self.ignore, str):
            raise ConfigError("targets and ignore are lists of module-name patterns, e.g. ['*.mlp.*']")
        for value in self.overrides.values():
            resolve_sparsity(Unstructured(), value)
        if isinstance(self.calibration, dict):
            self.calibration = build_config(CalibrationConfig, self.calibration, "calibration")
        if isinstance(self.quantize, dict):
            self.quantize = build_config(QuantConfig, self.quantize, "quantize")
        if self.quantize is not None and not isinstance(self.quantize, QuantConfig):
            raise ConfigError(f"quantize must be a mapping like {{bits: 8, method: joint}} or null, got {self.quantize!r}")
        if self.quantize is not None and self.quantize.method == "joint" and self.method != "sparsegpt":
            raise ConfigError(f"joint quantization runs inside SparseGPT's pass; method {self.method!r} cannot do it: "
                              "use method 'sparsegpt', or quantize method 'rtn'")
        if self.quantize is not None and "quantize" in self.method_options:
            raise ConfigError("give quantization once: either quantize or method_options.quantize, not both")

    @property
    def pattern_value(self) -> Pattern:
        return parse(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsifyConfig":
        return build_config(cls, data, "stage")

    def sparsity_for(self, name: str, allocated: float | None = None) -> float:
        """Sparsity of module ``name``: the last matching override, else ``allocated`` or the default."""
        value = self.sparsity if allocated is None else allocated
        for pattern, override in self.overrides.items():
            if name_matches(name, pattern):
                value = override
        return value


def build_config(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping; unknown keys or wrong types -> :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as exc:  # wrong types that the dataclass itself rejects
        raise ConfigError(f"invalid {where}: {exc}") from exc


def name_matches(name: str, pattern: str) -> bool:
    """Match a module name against a glob (``"*.mlp.*"``) or a regex written ``"re:<regex>"``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def parse_recipe(text: str) -> list[SparsifyConfig]:
    """Parse recipe YAML text into configs (see module doc for the layout)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe is not valid YAML: {exc}") from exc
    if isinstance(data, dict) and "stages" in data:
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ConfigError(f"recipe version {version!r} is not supported (this sparseforge reads version {RECIPE_VERSION})")
        extra = sorted(set(data) - {"version", "stages"})
        if extra:
            raise ConfigError(f"unknown top-level recipe key(s) {extra}; a recipe has 'version' and 'stages'")
        stages = data["stages"]
    elif isinstance(data, dict):
        stages = [data]
    else:
        stages = data
    if not isinstance(stages, list) or not stages:
        raise ConfigError("a recipe needs a non-empty list of stages")
    return [build_config(SparsifyConfig, s, f"stage {i}") for i, s in enumerate(stages)]


def load_recipe(path: "str | Path") -> list[SparsifyConfig]:
    return parse_recipe(read_text_file(path, "recipe file"))


def read_text_file(path: "str | Path", what: str) -> str:
    """The UTF-8 text of ``path``; ConfigError if it is missing, unreadable or binary."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"\0" in data:
        raise ConfigError(f"{what} {path} is a binary file, not YAML text; give a YAML file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); give a YAML file"
        ) from None


def dump_recipe(configs: list[SparsifyConfig]) -> str:
    """YAML text that :func:`parse_recipe` reads back into equal configs."""
    import yaml

    return yaml.safe_dump(
        {"version": RECIPE_VERSION, "stages": [c.to_dict() for c in configs]}, sort_keys=False
    )
