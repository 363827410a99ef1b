"""Sparsity patterns as typed, immutable values.

A pattern says *which shapes of zeros are allowed* in a 2-D weight ``(out_features, in_features)``;
the sparsity level says *how many*. Patterns never pick weights themselves: that is the job of
:func:`sparseforge.masks.mask_from_scores`, the one place with top-k / N:M / block selection.

=================  ==================  =====================================================
value              string form         meaning
=================  ==================  =====================================================
``Unstructured()`` ``"unstructured"``  any entry may be zero
``NM(2, 4)``       ``"2:4"``           every group of M consecutive inputs of a row keeps N
``Block(4, 4)``    ``"block4x4"``      zeros come in aligned h x w tiles
``FanIn()``        ``"fanin"``         every output row keeps the same number of inputs
``FanIn(16)``      ``"fanin16"``       ... exactly 16 of them (fixes the sparsity)
``Channel()``      ``"channel"``       whole output rows are zero
=================  ==================  =====================================================

Example:
    >>> from sparseforge.patterns import parse, NM
    >>> parse("2:4") == NM(2, 4)
    True
    >>> str(parse("block4x8"))
    'block4x8'
    >>> NM(2, 4).sparsity
    0.5
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from sparseforge.errors import ConfigError

__all__ = ["Pattern", "Unstructured", "NM", "Block", "FanIn", "Channel", "DEFAULT_NM", "parse", "check_fits"]


@dataclass(frozen=True)
class Unstructured:
    """Any entry may be pruned."""

    def __str__(self) -> str:
        return "unstructured"

    @property
    def sparsity(self) -> None:
        """Sparsity fixed by the pattern itself (``None``: set by the caller)."""
        return None


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: every M consecutive inputs of a row keep exactly N.

    Any ``0 < n < m`` is valid (2:4 and 4:8 for NVIDIA sparse tensor cores, 1:4, 16:32, ...).
    The pattern fixes the sparsity at ``1 - n/m``.
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise ConfigError(f"N:M pattern needs integers, got n={self.n!r}, m={self.m!r}")
        if not 0 < self.n < self.m:
            raise ConfigError(
                f"N:M pattern '{self.n}:{self.m}' is invalid: need 0 < N < M "
                "(N weights kept out of every M), e.g. '2:4' or '4:8'"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m


DEFAULT_NM = NM(2, 4)  # the N:M pattern used when none is given (NVIDIA's 2:4; what the kernels detect)


@dataclass(frozen=True)
class Block:
    """Block sparsity: zeros come in aligned ``h x w`` tiles (``h`` rows by ``w`` inputs)."""

    h: int
    w: int

    def __post_init__(self) -> None:
        if not (isinstance(self.h, int) and isinstance(self.w, int)) or self.h < 1 or self.w < 1:
            raise ConfigError(
                f"block pattern needs positive integer sizes, got {self.h!r}x{self.w!r}; "
                "write e.g. 'block4x4' or 'block1x8'"
            )

    def __str__(self) -> str:
        return f"block{self.h}x{self.w}"

    @property
    def sparsity(self) -> None:
        return None


@dataclass(frozen=True)
class FanIn:
    """Constant fan-in: every output row keeps the same number ``k`` of inputs.

    ``FanIn()`` derives ``k = round(in_features * (1 - sparsity))`` per layer; ``FanIn(k)`` fixes
    it. This is the pattern of Structured RigL (Lasby et al., 2023) and of the condensed format.
    """

    k: int | None = None

    def __post_init__(self) -> None:
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ConfigError(f"fan-in pattern needs a positive integer k, got {self.k!r}; write 'fanin' or 'fanin16'")

    def __str__(self) -> str:
        return "fanin" if self.k is None else f"fanin{self.k}"

    @property
    def sparsity(self) -> None:
        return None


@dataclass(frozen=True)
class Channel:
    """Channel (output-row) sparsity: whole output rows are pruned."""

    def __str__(self) -> str:
        return "channel"

    @property
    def sparsity(self) -> None:
        return None


Pattern = Union[Unstructured, NM, Block, FanIn, Channel]
PATTERN_TYPES = (Unstructured, NM, Block, FanIn, Channel)

_NM_RE = re.compile(r"^(-?\d+):(-?\d+)$")
_BLOCK_RE = re.compile(r"^block(-?\d+)x(-?\d+)$")
_FANIN_RE = re.compile(r"^fanin(-?\d+)?$")
_HELP = "valid patterns: 'unstructured', 'N:M' (e.g. '2:4'), 'blockHxW' (e.g. 'block4x4'), 'fanin', 'fanin16', 'channel'"


def parse(text: "str | Pattern") -> Pattern:
    """Parse a pattern string (``str(pattern)`` round-trips). Pattern values pass through.

    Raises :class:`~sparseforge.errors.ConfigError` naming the valid forms on bad input.
    """
    if isinstance(text, PATTERN_TYPES):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"pattern must be a string or Pattern, got {type(text).__name__}; {_HELP}")
    s = text.strip().lower()
    if not s:
        raise ConfigError(f"empty pattern string; {_HELP}")
    if s == "dense":
        raise ConfigError("'dense' is not a sparsity pattern; to leave layers dense, list them in 'ignore'")
    if s == "unstructured":
        return Unstructured()
    if s == "channel":
        return Channel()
    if m := _NM_RE.match(s):
        return NM(int(m.group(1)), int(m.group(2)))
    if m := _BLOCK_RE.match(s):
        return Block(int(m.group(1)), int(m.group(2)))
    if m := _FANIN_RE.match(s):
        return FanIn(None if m.group(1) is None else int(m.group(1)))
    raise ConfigError(f"cannot parse sparsity pattern {text!r}; {_HELP}")


def check_fits(pattern: Pattern, shape: tuple[int, ...], layer: str = "<weight>") -> None:
    """Raise :class:`ConfigError` naming ``layer`` and the fix when ``pattern`` cannot tile ``shape``.

    ``shape`` is ``(out_features, in_features)``.
    """
    if len(shape) != 2:
        raise ConfigError(f"layer {layer}: patterns apply to 2-D weights, got shape {tuple(shape)}")
    rows, cols = shape
    fix = f"add '{layer}' to ignore, or choose another pattern"
    if isinstance(pattern, NM) and cols % pattern.m:
        raise ConfigError(
            f"layer {layer}: in_features={cols} is not divisible by M={pattern.m} of pattern {pattern}; {fix}"
        )
    if isinstance(pattern, Block) and (rows % pattern.h or cols % pattern.w):
        raise ConfigError(f"layer {layer}: shape {rows}x{cols} is not divisible by {pattern}; {fix}")
    if isinstance(pattern, FanIn) and pattern.k is not None and pattern.k > cols:
        raise ConfigError(f"layer {layer}: {pattern} keeps more inputs than in_features={cols}; {fix}")
