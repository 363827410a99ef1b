"""Tile sizes of the batch-in-lanes sparse kernels, measured on the machine instead of assumed.

For a batch of at least :data:`LANES_MIN_BATCH` rows the CSR, bitmap, N:M and BSR kernels keep the
batch in SIMD lanes (``docs/kernels.md``, "lanes"): they walk the input columns in tiles of
``col_tile`` columns (the transposed x tile stays in L1/L2) while a block of ``block_rows`` weight
rows streams through it. Both have a built-in rule (``csrc/driver.h`` ``lanes_rows``: columns
``32 / density`` rounded to a power of two in 128..512, rows ``32 / density`` in 16..256) that was
swept on one machine. :class:`LanesTile` overrides them per call (``sparseforge.ops.linear(...,
col_tile=, block_rows=)``), and :func:`measured_tile` picks the fastest of a few candidates for a
weight and batch on this machine: timed interleaved (:func:`sparseforge.measure.choose.choose_by_timing`,
the noise rules of :mod:`sparseforge.measure.timing`), kept only when clearly faster than the rule
(a noisy machine keeps the rule), and cached per CPU model, flags, threads, format, value dtype,
shape, density (to 1%) and batch bucket in the tuning cache (``sparseforge cache clear`` forgets it).

The tile changes the speed only: every candidate gives the rule's result up to the summation order
of float32 (the column tile splits each row's dot product into per-tile partial sums; the row
block only divides the rows among tasks and changes nothing, bit for bit).

Measuring happens ahead of use, never inside a forward: ``compress_`` measures the layers it builds
(:func:`sparseforge.runtime.tiles.measure_tiles_`, once per distinct question, batch bucket 64 by
default) and ``sparseforge advise`` the chosen format's tiles (it prints them). A
:class:`~sparseforge.nn.SparseLinear` forward takes the tile the layer was given, else the cached answer
for its question (:func:`known_tile`), else the rule: its first call times nothing
(:func:`tile_for` with ``measure=False``; the choice is logged at debug level).
``SPARSEFORGE_LANES_TILE=rule`` turns the measuring off (the rule always).

Example:
    >>> import torch, tempfile, os
    >>> from sparseforge.formats import BitmapWeight
    >>> from sparseforge.measure.lanes_tile import LanesTile, measured_tile
    >>> from sparseforge.measure.tuning_cache import TuningCache
    >>> w = BitmapWeight.from_dense(torch.randn(256, 512) * (torch.rand(256, 512) > 0.75))
    >>> cache = TuningCache(os.path.join(tempfile.mkdtemp(), "t.json"))
    >>> tile, choice = measured_tile(w, 64, budget_s=0.01, cache=cache)
    >>> isinstance(tile, LanesTile) and choice.name == tile.label
    True
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from sparseforge.errors import ConfigError
from sparseforge.measure.choose import Choice, choose_by_timing
from sparseforge.measure.tuning_cache import TuningCache

__all__ = ["LanesTile", "RULE", "LANES_MIN_BATCH", "MIN_WEIGHTS", "TILED_FAMILIES", "BUCKETS", "candidates", "batch_bucket",
           "tile_question", "measured_tile", "known_tile", "tile_for", "tiling_enabled", "tiles_apply", "tileable"]

log = logging.getLogger(__name__)

LANES_MIN_BATCH = 4  # csrc/driver.h kLanesMinBatch: batches from this size run the lanes kernels
MIN_WEIGHTS = 1 << 18  # out * in below which a layer is not measured (one tile covers it; the rule is fine)
TILED_FAMILIES = ("csr", "bitmap", "nm", "bsr")  # kernel families whose forward has the lanes path
COL_TILES = (128, 256, 512, 1024)  # candidates besides the rule
BLOCK_ROWS = (32, 128)
BUCKETS = (16, 32, 48, 64)  # every batch bucket (batch_bucket)


@dataclass(frozen=True)
class LanesTile:
    """Columns per tile and rows per task of the lanes kernels; 0 is the built-in rule's value.

    ``col_tile``: a multiple of 64 in 64..1024 (at 64 batch lanes; fewer lanes get proportionally
    more columns); ``block_rows``: 1..256.
    """

    col_tile: int = 0
    block_rows: int = 0

    def __post_init__(self):
        from sparseforge.ops import check_tile

        check_tile(self.col_tile, self.block_rows)

    @property
    def label(self) -> str:
        """``"rule"``, ``"cols256"``, ``"rows32"`` or ``"cols256-rows32"`` (the cache's candidate names)."""
        parts = ([f"cols{self.col_tile}"] if self.col_tile else []) + ([f"rows{self.block_rows}"] if self.block_rows else [])
        return "-".join(parts) or "rule"

    @classmethod
    def from_label(cls, label: str) -> "LanesTile":
        """Inverse of :attr:`label`."""
        col = rows = 0
        if label != "rule":
            for part in label.split("-"):
                if part.startswith("cols") and part[4:].isdigit():
                    col = int(part[4:])
                elif part.startswith("rows") and part[4:].isdigit():
                    rows = int(part[4:])
                else:
                    raise ConfigError(f"{label!r} is not a lanes tile label (e.g. 'rule', 'cols256', 'cols256-rows32')")
        return cls(col, rows)

    def kwargs(self) -> dict[str, int]:
        """``{"col_tile": ..., "block_rows": ...}`` for :func:`sparseforge.ops.linear`."""
        return {"col_tile": self.col_tile, "block_rows": self.block_rows}


RULE = LanesTile()


def candidates() -> list[LanesTile]:
    """The tiles :func:`measured_tile` times: the rule, each column tile, each row block."""
    return [RULE] + [LanesTile(c, 0) for c in COL_TILES] + [LanesTile(0, r) for r in BLOCK_ROWS]


def tiling_enabled() -> bool:
    """False when ``SPARSEFORGE_LANES_TILE=rule`` (never measure; the rule always)."""
    mode = os.environ.get("SPARSEFORGE_LANES_TILE", "auto").strip().lower()
    if mode not in ("auto", "rule"):
        raise ConfigError(f"SPARSEFORGE_LANES_TILE={mode!r}; use 'auto' (measure) or 'rule' (the built-in tiles)")
    return mode == "auto"


def batch_bucket(batch: int) -> int:
    """The batch a measurement stands for: the lanes kernels work in tiles of 64 rows of 16-lane
    vectors, so ``batch`` rounds up to a multiple of 16, at most 64."""
    return min(64, -(-int(batch) // 16) * 16)


def _family(weight) -> str:
    from sparseforge.formats import registry

    return registry.spec_of(weight).kernel_family


def tile_question(weight, batch: int) -> dict:
    """What a tile answer depends on besides the machine (the tuning cache's question)."""
    out, inp = weight.shape
    return {"family": _family(weight), "dtype": str(weight.dtype).removeprefix("torch."), "shape": [int(out), int(inp)],
            "density": round(weight.nnz / max(1, out * inp), 2), "batch": batch_bucket(batch)}


def tiles_apply(weight) -> bool:
    """Whether ``weight``'s kernels take a tile: CSR, bitmap, N:M or BSR with float32 / bfloat16 values."""
    return weight.dtype in (torch.float32, torch.bfloat16) and _family(weight) in TILED_FAMILIES


def tileable(weight, batch: int) -> bool:
    """Whether ``weight`` at ``batch`` rows runs the lanes kernels and is big enough to measure."""
    out, inp = weight.shape
    return batch >= LANES_MIN_BATCH and out * inp >= MIN_WEIGHTS and tiles_apply(weight)


def measured_tile(weight, batch: int, *, budget_s: float = 0.05, cache: Optional[TuningCache] = None,
                  threads: Optional[int] = None) -> tuple[LanesTile, Choice]:
    """The fastest :func:`candidates` tile for ``weight`` (a CSR, bitmap, N:M or BSR format object with
    float32 / bfloat16 values) at ``batch`` rows on this machine, and the :class:`Choice` behind it.

    Measured once per machine and question (:func:`tile_question`) and cached; the rule is kept
    unless another tile is clearly faster (a noisy machine keeps the rule, uncached).
    """
    from sparseforge import ops

    if not tiles_apply(weight):
        raise ConfigError(f"lanes tiles apply to float32 / bfloat16 {', '.join(TILED_FAMILIES)} weights, "
                          f"got {_family(weight)} with {weight.dtype} values")
    bucket = batch_bucket(max(batch, LANES_MIN_BATCH))
    x = torch.randn(bucket, weight.shape[1])  # (bucket, in)

    def run(tile: LanesTile):
        return lambda: ops.linear(x, weight, None, **tile.kwargs())

    with torch.no_grad():
        choice = choose_by_timing("lanes_tile", tile_question(weight, bucket), {t.label: run(t) for t in candidates()},
                                  default=RULE.label, budget_s=budget_s, cache=cache, threads=threads)
    return LanesTile.from_label(choice.name), choice


def known_tile(weight, batch: int, *, cache: Optional[TuningCache] = None) -> Optional[LanesTile]:
    """The tile the tuning cache already holds for ``weight`` at ``batch`` rows on this machine (a
    lookup, nothing timed); ``None`` when it holds none or the weight takes no measured tile."""
    if not tiling_enabled() or not tileable(weight, batch):
        return None
    cache = cache if cache is not None else TuningCache()
    stored = cache.get("lanes_tile", tile_question(weight, batch_bucket(batch)))
    return None if stored is None else LanesTile.from_label(stored["name"])


def tile_for(weight, batch: int, *, cache: Optional[TuningCache] = None,
             measure: bool = True, budget_s: float = 0.05) -> tuple[LanesTile, Optional[Choice]]:
    """The tile a forward of ``batch`` rows should use, when the weight runs the lanes kernels, is at
    least :data:`MIN_WEIGHTS` weights and measuring is on (:func:`tiling_enabled`): with ``measure=True``
    the measured one (:func:`measured_tile`, ``budget_s`` per candidate), with ``measure=False`` the
    cached one (:func:`known_tile`) or the rule, without timing anything. Else the rule (and no Choice).
    The choice and where it came from are logged at debug level (logger ``sparseforge.measure.lanes_tile``)."""
    if not tiling_enabled() or not tileable(weight, batch):
        return RULE, None
    if measure:
        tile, choice = measured_tile(weight, batch, cache=cache, budget_s=budget_s)
        how = choice.reason if choice else ""
    else:
        known = known_tile(weight, batch, cache=cache)
        tile, choice = known or RULE, None
        how = ("cached measurement" if known is not None
               else "not measured on this machine yet: compress_ or `sparseforge advise` measures it")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("lanes tile %s -> %s (%s)", tile_question(weight, batch), tile.label, how)
    return tile, choice
