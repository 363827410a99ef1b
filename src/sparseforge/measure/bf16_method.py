"""Which bf16 product pays for a sparse weight on *this* machine: dense panels or the zero-skipping walk.

The batched bf16-compute product (:func:`sparseforge.ops.linear_bf16`) has two methods with the same
arithmetic (bf16 operands, float32 sums; they differ in summation order only):

* ``panel``: the weight is decompressed, 32 rows x 128 columns at a time, into dense bf16 panels that
  are multiplied on AMX (or ``vdpbf16ps``): the cost follows the *dense* size, the bytes the sparse one;
* ``skip``: the float32 batch-in-lanes walk of the format (``docs/kernels.md``, "lanes") over the
  stored values only, ``x`` widened from bf16: the cost follows the *stored* values (bfloat16 values only).

Which one wins depends on the CPU (AMX or not, its clock, caches and memory), the density, the shape,
the batch and the thread count, so it is measured, never assumed: :func:`measured_method` times both on
the weight (:func:`sparseforge.measure.choose.choose_by_timing`: interleaved rounds, ``panel`` kept
unless ``skip`` is clearly faster, a noisy machine keeps ``panel`` uncached) and caches the answer per
CPU, threads and question (:func:`method_question`: family, value dtype, shape, density to 1%, batch
bucket) in the tuning cache (``sparseforge cache clear`` forgets it). :func:`known_method` is the
lookup a forward does (nothing timed): :func:`linear_bf16_auto` runs the cached answer, else ``panel``
(:class:`~sparseforge.nn.SparseLinear` with bf16 compute calls it). Measuring happens ahead of use (a benchmark, ``compress_``-time code or the user),
never inside a forward. ``SPARSEFORGE_BF16_METHOD=panel|skip`` forces the method of :func:`linear_bf16_auto`.

Example:
    >>> import torch, tempfile, os
    >>> from sparseforge.formats import BitmapWeight
    >>> from sparseforge.measure.bf16_method import measured_method, known_method
    >>> from sparseforge.measure.tuning_cache import TuningCache
    >>> w = BitmapWeight.from_dense((torch.randn(256, 512) * (torch.rand(256, 512) > 0.9)).bfloat16())
    >>> cache = TuningCache(os.path.join(tempfile.mkdtemp(), "t.json"))
    >>> name, choice = measured_method(w, 64, budget_s=0.01, cache=cache)
    >>> name in ("panel", "skip") and known_method(w, 64, cache=cache) in (name, None)
    True
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from sparseforge.errors import ConfigError
from sparseforge.measure.choose import Choice, choose_by_timing
from sparseforge.measure.lanes_tile import batch_bucket, tile_question
from sparseforge.measure.tuning_cache import TuningCache

__all__ = ["METHODS", "method_question", "skip_applies", "forced_method", "measured_method", "known_method"]

log = logging.getLogger(__name__)

METHODS = ("panel", "skip")
_KIND = "bf16_method"


def method_question(weight, batch: int) -> dict:
    """What a method answer depends on besides the machine (the tuning cache's question)."""
    return tile_question(weight, batch_bucket(max(16, batch)))


def skip_applies(weight) -> bool:
    """Whether ``weight`` can run the ``skip`` method: bfloat16 values (float32 ones would be rounded per call)."""
    return weight.dtype == torch.bfloat16


def forced_method() -> Optional[str]:
    """``SPARSEFORGE_BF16_METHOD`` (``panel`` or ``skip``), or ``None`` when unset, empty or ``auto``."""
    mode = os.environ.get("SPARSEFORGE_BF16_METHOD", "").strip().lower()
    if mode in ("", "auto"):
        return None
    if mode not in METHODS:
        raise ConfigError(f"SPARSEFORGE_BF16_METHOD={mode!r}; use auto, panel (dense panels, AMX) or skip (zero-skipping walk)")
    return mode


def measured_method(weight, batch: int, *, budget_s: float = 0.1, cache: Optional[TuningCache] = None,
                    threads: Optional[int] = None) -> tuple[str, Optional[Choice]]:
    """The faster bf16 method for ``weight`` (a bitmap, N:M or CSR format object) at ``batch`` rows on
    this machine, and the :class:`Choice` behind it (``None`` when only ``panel`` applies).

    Timed once per machine and question (:func:`method_question`, ``budget_s`` per method) and cached;
    ``panel`` is kept unless ``skip`` is clearly faster.
    """
    from sparseforge.ops import linear_bf16

    if not skip_applies(weight):
        return "panel", None
    x = torch.randn(batch_bucket(max(16, batch)), weight.shape[1]).bfloat16()  # (bucket, in)
    with torch.no_grad():
        choice = choose_by_timing(_KIND, method_question(weight, batch),
                                  {m: (lambda m=m: linear_bf16(x, weight, method=m)) for m in METHODS},
                                  default="panel", budget_s=budget_s, cache=cache, threads=threads)
    log.debug("bf16 method %s for %s at batch %d: %s", choice.name, tuple(weight.shape), batch, choice.reason)
    return choice.name, choice


def known_method(weight, batch: int, *, cache: Optional[TuningCache] = None) -> Optional[str]:
    """The method the tuning cache holds for ``weight`` at ``batch`` rows on this machine (a lookup,
    nothing timed), ``SPARSEFORGE_BF16_METHOD`` when set; ``None`` when neither says."""
    forced = forced_method()
    if forced is not None:
        return forced
    if not skip_applies(weight):
        return None
    cache = cache if cache is not None else TuningCache()
    stored = cache.get(_KIND, method_question(weight, batch))
    return None if stored is None else str(stored["name"])


def linear_bf16_auto(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`sparseforge.ops.linear_bf16` with the method :func:`known_method` gives for this weight and
    ``x``'s batch (rows), else ``"panel"``: a cache lookup, nothing timed."""
    from sparseforge.ops import linear_bf16

    batch = x.numel() // max(1, x.shape[-1]) if x.dim() else 1
    return linear_bf16(x, weight, bias, method=known_method(weight, batch) or "panel")
