"""The options of S²FT fine-tuning (torch-free): :class:`S2FTConfig` and its ``sparseforge finetune`` flags.

S²FT (Yang et al. 2024, "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured
Sparsity") trains a few attention heads and FFN channels of every block as dense slices and freezes
the rest; :mod:`sparseforge.finetune.s2ft` runs it. ``FinetuneConfig(adapter="s2ft", s2ft=...)``
selects it; ``s2ft`` is an :class:`S2FTConfig`, a dict of its fields, or ``None`` (the defaults).

Example:
    >>> from sparseforge.finetune.s2ft_options import S2FTConfig
    >>> S2FTConfig(budget=0.01, parts="o,down").parts
    ('o', 'down')
    >>> S2FTConfig(budget=20_000).budget
    20000
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sparseforge.errors import ConfigError

__all__ = ["S2FTConfig", "PARTS", "SELECTIONS", "HEAD_PARTS", "CHANNEL_PARTS", "check_s2ft_options",
           "add_s2ft_arguments", "s2ft_kwargs"]

HEAD_PARTS = ("q", "k", "v", "o")  # attention projections; a unit is a key/value head and its query group
CHANNEL_PARTS = ("up", "gate", "down")  # FFN projections; a unit is one intermediate channel
PARTS = HEAD_PARTS + CHANNEL_PARTS
SELECTIONS = ("random", "weight", "activation")


@dataclass
class S2FTConfig:
    """Which heads and channels S²FT trains.

    Attributes:
        budget: trainable parameters: a fraction in (0, 1) of the model's parameters, or a count
            (an integer >= 1). Default 0.01 (the paper trains ~0.9% of Llama-2-7B with o and down).
        parts: the projections whose slices of the selected units train, from ``q, k, v, o`` (rows of
            q/k/v, columns of o, per key/value head and its query group) and ``up, gate, down`` (rows of
            up/gate, columns of down, per channel). Default ``"o,down"``: the reference's setting.
        select: ``"random"`` (the paper's default), ``"weight"`` (largest weight norm of the unit in
            ``parts``) or ``"activation"`` (largest mean |input| of the unit into o_proj / down_proj on
            ``calibration_batches`` training batches). Scores are divided by their block's mean and the
            units are picked across all blocks at once, as the reference samples across blocks.
        calibration_batches: batches of the training data that score ``"activation"``.
        independent: the row parts (q, k, v / up, gate) and the column part (o / down) of each
            structure draw their own units within the budget, as the reference samples v and o, and
            up and down, independently; the co-permutation then orders each block's units
            ``[rows only, both, columns only, rest]``. Default False: one selection per structure.
    """

    budget: Any = 0.01
    parts: Any = ("o", "down")
    select: str = "random"
    calibration_batches: int = 4
    independent: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ConfigError(f"s2ft budget must be a fraction in (0, 1) or a parameter count >= 1, got {self.budget!r}")
        if isinstance(self.budget, float) and not 0 < self.budget < 1:
            raise ConfigError(f"s2ft budget {self.budget!r} is out of range: give a fraction of the model's parameters "
                              "in (0, 1), e.g. 0.01, or an integer count of parameters")
        if isinstance(self.budget, int) and self.budget < 1:
            raise ConfigError(f"s2ft budget must be a parameter count >= 1 or a fraction in (0, 1), got {self.budget!r}")
        parts = self.parts.split(",") if isinstance(self.parts, str) else self.parts
        if not isinstance(parts, (list, tuple)) or not parts:
            raise ConfigError(f"s2ft parts must name some of {', '.join(PARTS)}, got {self.parts!r}")
        parts = tuple(str(p).strip() for p in parts)
        unknown = [p for p in parts if p not in PARTS]
        if unknown or len(set(parts)) != len(parts):
            raise ConfigError(f"s2ft parts {','.join(parts)!r}: choose distinct names from {', '.join(PARTS)}")
        self.parts = tuple(p for p in PARTS if p in parts)  # canonical order
        if self.select not in SELECTIONS:
            raise ConfigError(f"s2ft select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if not isinstance(self.independent, bool):
            raise ConfigError(f"s2ft independent must be true or false, got {self.independent!r}")
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) \
                or self.calibration_batches < 1:
            raise ConfigError(f"s2ft calibration_batches must be an integer >= 1, got {self.calibration_batches!r}")


def check_s2ft_options(cfg: Any) -> None:
    """Normalise ``cfg.s2ft`` of a FinetuneConfig into an :class:`S2FTConfig` (or ``None`` without S²FT)."""
    if cfg.adapter != "s2ft":
        if cfg.s2ft is not None:
            raise ConfigError("s2ft options are given but adapter is not 's2ft'; pass adapter='s2ft' (CLI: --adapter s2ft)")
        return
    if cfg.s2ft is None:
        cfg.s2ft = S2FTConfig()
    elif isinstance(cfg.s2ft, dict):
        valid = {f.name for f in dataclasses.fields(S2FTConfig)}
        unknown = sorted(set(cfg.s2ft) - valid)
        if unknown:
            raise ConfigError(f"unknown s2ft options {unknown}; valid options: {', '.join(sorted(valid))}")
        cfg.s2ft = S2FTConfig(**cfg.s2ft)
    elif not isinstance(cfg.s2ft, S2FTConfig):
        raise ConfigError(f"s2ft must be an S2FTConfig, a dict of its options or None, got {type(cfg.s2ft).__name__}")
    if cfg.compute != "dense":
        raise ConfigError(f"S²FT trains dense slices: use compute='dense' (CLI: --compute dense), got {cfg.compute!r}")


def _budget(text: str) -> float | int:
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ConfigError(f"--s2ft-budget {text!r} is not a number: give a fraction like 0.01 or a count like 50000") from None


def add_s2ft_arguments(parser) -> None:
    """The ``sparseforge finetune`` S²FT options (argparse, torch-free)."""
    g = parser.add_argument_group("S²FT (structured sparse fine-tuning of selected heads and channels)")
    g.add_argument("--s2ft-budget", default=None,
                   help="trainable parameters: a fraction of the model's (e.g. 0.01, default) or a count (e.g. 50000)")
    g.add_argument("--s2ft-parts", default=None,
                   help=f"projections to train, from {','.join(PARTS)} (default o,down)")
    g.add_argument("--s2ft-select", default=None, choices=list(SELECTIONS),
                   help="how heads and channels are picked: random (the paper's default), weight or activation magnitude")
    g.add_argument("--s2ft-independent", action="store_true", default=None,
                   help="rows (q,k,v / up,gate) and columns (o / down) draw their own heads and channels (the reference's v/o, up/down)")


def s2ft_kwargs(args) -> dict[str, Any]:
    """FinetuneConfig keyword arguments from the parsed S²FT flags; the flags need ``--adapter s2ft``."""
    given = {key: getattr(args, f"s2ft_{key}") for key in ("budget", "parts", "select", "independent")}
    given = {key: value for key, value in given.items() if value is not None}
    if getattr(args, "adapter", "none") != "s2ft":
        if given:
            flags = ", ".join(f"--s2ft-{key}" for key in given)
            raise ConfigError(f"{flags} only apply to S²FT; add --adapter s2ft or drop them")
        return {}
    if "budget" in given:
        given["budget"] = _budget(given["budget"])
    return {"s2ft": S2FTConfig(**given)}
