"""Measure the lanes kernels' tiles of a model's sparse layers ahead of use, once per distinct question.

A :class:`~sparseforge.nn.SparseLinear` forward never times anything (its first call costs what the
others do): it uses the tile it was given, the tuning cache's answer, or the built-in rule
(:mod:`sparseforge.measure.lanes_tile`). :func:`measure_tiles_` gives the layers of a model their
measured tiles: layers that ask the same question (kernel family, value dtype, shape, density to 1%,
batch bucket; the 16 ``q_proj`` of a uniformly pruned 16-layer model ask one) are measured once and
the answer is handed to the others, so a machine too busy for the answer to be cached still times
each question once per process, not once per layer. ``compress_`` calls it on the layers it builds.

Example:
    >>> import torch
    >>> from sparseforge.runtime.tiles import measure_tiles_
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> measure_tiles_(net)  # no SparseLinear: nothing to measure
    {}
"""

from __future__ import annotations

import json
import logging
from typing import Iterable

from torch import nn

from sparseforge.measure.lanes_tile import BUCKETS, LANES_MIN_BATCH, batch_bucket, tile_question, tileable
from sparseforge.nn.sparse_linear import SparseLinear

__all__ = ["measure_tiles_"]

log = logging.getLogger(__name__)


def measure_tiles_(model: nn.Module, batches: Iterable[int] = BUCKETS, *, budget_s: float = 0.05,
                   names: "Iterable[str] | None" = None) -> dict[str, dict[int, str]]:
    """Give every ``SparseLinear`` of ``model`` (or those named in ``names``) with ``lanes_tile="auto"`` its
    tile for the batch bucket of each of ``batches``, measured on this machine (``budget_s`` per candidate)
    or read from the tuning cache, once per distinct question (module doc). Returns ``{layer name:
    {bucket: tile label}}`` for the layers that take a measured tile (large enough, a tiled format)."""
    wanted = None if names is None else set(names)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear) and m.lanes_tile == "auto"
              and (wanted is None or n in wanted)]
    buckets = sorted({batch_bucket(b) for b in batches if b >= LANES_MIN_BATCH})
    answers: dict[str, object] = {}  # question -> tile, this call's measurements
    out: dict[str, dict[int, str]] = {}
    for name, layer in layers:
        weight = layer.weight_format
        for bucket in buckets:
            if not tileable(weight, bucket):
                continue
            key = json.dumps(tile_question(weight, bucket), sort_keys=True)
            if key in answers:
                layer.set_lanes_tiles({bucket: answers[key]})
            else:
                answers[key] = layer.measure_lanes_tiles((bucket,), budget_s=budget_s)[bucket]
            out.setdefault(name, {})[bucket] = answers[key].label
    log.debug("lanes tiles: %d question(s) for %d layer(s) at buckets %s", len(answers), len(out), buckets)
    return out
