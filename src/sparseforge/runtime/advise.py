"""Will sparse be faster on *this* machine? Measure it: the advisor behind ``format="auto"``.

Speedups from sparsity depend on the CPU (SIMD width, cache sizes, memory bandwidth), the thread
count, the layer shape, the batch size and the sparsity. Rules of thumb get it wrong, so the
advisor times the candidates on the machine it runs on:

* :func:`measure_layer` times one pruned ``(out, in)`` weight as the dense product
  (``torch.nn.functional.linear`` in the weight's dtype, float32 activations) and as every sparse
  format that can hold it (:func:`sparseforge.formats.registry.names`; a format whose
  ``from_dense`` refuses the mask is not a candidate), at each batch size, and picks the fastest.
  *Dense* is chosen unless a sparse format is at least ``min_speedup`` times faster, averaged over
  the batch sizes, and measurably so (below).
* :func:`advise_model` does that for every linear layer of a model, once per distinct
  (shape, dtype, pattern, sparsity to 1%) group, using the first layer of each group's own weights,
  and keeps each group's answer in the per-machine tuning cache
  (:mod:`sparseforge.measure.tuning_cache`; ``sparseforge cache clear`` forgets it).
  :func:`sparseforge.runtime.compress.compress_` with ``format="auto"`` follows its choices.
* :mod:`sparseforge.runtime.sweep` times random weights over a list of sparsities for the
  speedup-vs-sparsity table and plot.

Timing protocol (:func:`sparseforge.measure.timing.time_interleaved`): the candidates are called in
a fresh random order every round, so load from other processes hits all of them alike, until every
median is known to 2% or ``budget_s`` seconds per candidate have passed. A format's speedup is the
median over rounds of the *paired* ratio dense time / format time (both called in the same round,
so drift between rounds cancels; :attr:`LayerAdvice.paired`). Decisions that the numbers cannot
support are re-measured with twice, then four times the budget, and then refused, with the reason
in :attr:`LayerAdvice.note` (a close call between the two fastest formats on an unsettled machine is
re-measured the same way, then the faster median wins):

* a format whose speedup over dense exceeds :data:`PLAUSIBLE_GAIN` times the larger of its bytes
  advantage and its multiply-add advantage (1 / density) is dropped as implausible (a preempted
  dense call, not a real speedup);
* a format whose speedup's confidence interval still reaches 1 on an unsettled (noisy) machine is
  not chosen: dense is kept and the note says the machine was too noisy to decide.

Memory state: in a model bigger than the last-level cache (:func:`sparseforge.runtime.machine.last_level_cache`)
every layer's weights come from memory. Each candidate then cycles through copies of the weight
totalling :func:`stream_bytes` (twice the last-level cache, at least :data:`STREAM_BYTES`, at most a
quarter of the available memory across candidates), so that no copy is still cached when it is read
again. Threads: torch and the sparse kernels both use ``threads`` (default torch's current count).

The CLI is ``sparseforge advise MODEL --batch-sizes 1 64 --plot advise.png``.

Example:
    >>> import torch
    >>> from sparseforge.runtime.advise import measure_layer
    >>> w = torch.randn(64, 128) * (torch.rand(64, 128) > 0.9)   # 90% zeros
    >>> adv = measure_layer(w, batch_sizes=(1,), budget_s=0.01)
    >>> sorted(adv.timings) == sorted(["dense", "bitmap", "csr"])
    True
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from sparseforge.errors import ConfigError
from sparseforge.measure.lanes_tile import LANES_MIN_BATCH, tile_for
from sparseforge.measure.timing import time_interleaved
from sparseforge.measure.tuning_cache import TuningCache
from sparseforge.patterns import DEFAULT_NM, Pattern
from sparseforge.runtime.advice import AdviceReport, LayerAdvice
from sparseforge.runtime.machine import available_memory_bytes, last_level_cache, machine_info, set_threads

__all__ = ["LayerAdvice", "AdviceReport", "measure_layer", "advise_model", "check_budget", "stream_bytes", "weights_stream",
           "STREAM_BYTES", "PLAUSIBLE_GAIN"]

STREAM_BYTES = 96 << 20  # weight copies cycled per candidate at least, when the model does not fit in cache
HUGE_PAGE_BYTES = 2 << 20  # weights at least this big are copied through from_dense (huge pages)
PLAUSIBLE_GAIN = 1.5  # a format may beat dense by at most this times max(dense bytes / its bytes, 1 / density)
REL_TOL = 0.02  # time until every median is known to 2% (or the budget runs out)
ATTEMPTS = 3  # measurements of a batch size at most (budget x1, x2, x4) while a decision is unclear


def check_budget(budget_s: float) -> None:
    """ConfigError unless ``budget_s`` (seconds of calls per candidate) is a finite number >= 0."""
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not math.isfinite(budget_s) or budget_s < 0:
        raise ConfigError(f"--budget (seconds of calls per candidate) must be a finite number >= 0, got {budget_s!r}")


def stream_bytes(candidates: int) -> int:
    """Bytes of weight copies each of ``candidates`` cycles through when streaming: twice this
    machine's last-level cache (so no copy survives in it until read again), at least
    :data:`STREAM_BYTES`, at most a quarter of the available memory shared by the candidates."""
    want = max(STREAM_BYTES, 2 * last_level_cache().nbytes)
    return max(STREAM_BYTES, min(want, available_memory_bytes() // (4 * max(1, candidates))))


def weights_stream(model: nn.Module) -> bool:
    """True when ``model``'s linear weights together exceed this machine's last-level cache, so each
    layer's weights come from memory when the model runs (the state :func:`measure_layer` times
    with ``stream=True``); a smaller model runs with its weights in cache."""
    from sparseforge.layers import linear_layers, weight_2d

    modules = dict(model.named_modules())
    total = sum(weight_2d(modules[n]).numel() * weight_2d(modules[n]).element_size() for n in linear_layers(model))
    return total > last_level_cache().nbytes


def _candidate_pattern(fmt: str, pattern: "Pattern | str | None") -> Optional[str]:
    """The pattern a structured format is built with: N:M for ``nm`` (the recorded one, else 2:4),
    the recorded block for ``bsr``; ``None`` for the others."""
    from sparseforge.patterns import NM, Block, parse

    recorded = parse(pattern) if pattern is not None else None
    if fmt == "nm":
        return str(recorded) if isinstance(recorded, NM) else str(DEFAULT_NM)
    if fmt == "bsr":
        return str(recorded) if isinstance(recorded, Block) else None
    return None


def _candidates(w: torch.Tensor, keep: torch.Tensor, pattern: "Pattern | str | None", formats: Optional[Sequence[str]],
                values_dtype: Optional[torch.dtype] = None):
    """{format: SparseLinear} for every format that can hold the masked weight, the masked weight, and a
    ``build(format)`` that makes another copy the same way (through ``from_dense``, so its buffers sit
    in huge pages like the model's; ``copy.deepcopy`` would give ordinary pages, which stream slower)."""
    from sparseforge.formats import registry
    from sparseforge.nn.sparse_linear import SparseLinear

    known = registry.names(sparse_linear=True)
    wanted = list(formats or known)
    unknown = [f for f in wanted if f not in known]
    if unknown:
        raise ConfigError(f"unknown format(s) {unknown}; the advisor knows {known}")
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(torch.where(keep, w, torch.zeros((), dtype=w.dtype)), requires_grad=False)
    def build(fmt: str) -> SparseLinear:
        return SparseLinear.from_linear(lin, fmt, pattern=_candidate_pattern(fmt, pattern), dtype=values_dtype)

    out = {}
    for fmt in wanted:
        try:
            out[fmt] = build(fmt)
        except ConfigError:
            continue  # the format cannot hold this mask (not N:M, rows of unequal length, no block pattern)
    return out, lin.weight.detach(), build


def measure_layer(w: torch.Tensor, *, batch_sizes: Sequence[int] = (1,), pattern: "Pattern | str | None" = None,
                  formats: Optional[Sequence[str]] = None, budget_s: float = 0.2, min_speedup: float = 1.05,
                  stream: bool = False, values_dtype: Optional[torch.dtype] = None) -> LayerAdvice:
    """Time a pruned ``(out, in)`` weight (zeros = pruned) dense and in each sparse format.

    Args:
        pattern: the layer's recorded pattern: an N:M one is used for the ``nm`` candidate (default
            2:4, if the weight obeys it), a block one for ``bsr``.
        formats: candidate formats (default every registered format, :func:`sparseforge.formats.registry.names`;
            those that cannot hold the mask are skipped).
        budget_s: at most this many seconds of calls per candidate and batch size (less once the
            medians are known to 2%).
        min_speedup: a sparse format is chosen only if dense / sparse time, averaged over the batch
            sizes, reaches this, and the difference is larger than the measurement's uncertainty.
        stream: cycle through copies of the weight (:func:`stream_bytes` per candidate) so it is
            read from memory, not cache, as in a model bigger than the cache.
        values_dtype: the sparse formats' values dtype (default the weight's); the dense baseline
            always runs in the weight's own dtype.
    """
    check_budget(budget_s)
    if w.dim() != 2:
        raise ConfigError(f"measure_layer needs an (out, in) weight, got shape {tuple(w.shape)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    w = w.detach()
    if w.dtype not in (torch.float32, torch.bfloat16):
        w = w.float()
    keep = w != 0  # (out, in)
    sparse, masked, build = _candidates(w, keep, pattern, formats, values_dtype)
    dense_bytes = masked.numel() * masked.element_size()
    copies = max(1, math.ceil(stream_bytes(1 + len(sparse)) / max(1, dense_bytes))) if stream else 1
    dense_ws = [masked.clone() for _ in range(copies)]
    # a weight below one huge page gains nothing from from_dense's huge-page buffers: plain copies build faster
    again = build if dense_bytes >= HUGE_PAGE_BYTES else (lambda f: copy.deepcopy(sparse[f]))
    sparse_ws = {f: [m] + [again(f) for _ in range(copies - 1)] for f, m in sparse.items()}
    density = max(float(keep.float().mean()), 1e-6)
    # a format can win by its bytes (memory-bound products) or by the multiply-adds it skips
    # (compute-bound ones, e.g. float32 at batch 64), never by much more than the larger of the two
    bound = {f: PLAUSIBLE_GAIN * max(1.0, dense_bytes / max(1, m.weight_format.nbytes), 1.0 / density)
             for f, m in sparse.items()}
    timings: dict[str, dict[int, float]] = {"dense": {}, **{f: {} for f in sparse}}
    tiles: dict[str, dict[int, str]] = {f: {} for f in sparse}  # lanes kernels' tile per batch (lanes_tile.py)
    speedups: dict[str, dict[int, float]] = {f: {} for f in sparse}  # median per-round dense / format time
    settled = {f: True for f in sparse}  # every batch: the speedup's interval excludes 1, or the medians settled
    implausible: set[str] = set()
    for b in batch_sizes:
        b = int(b)
        x = torch.randn(b, w.shape[1], generator=torch.Generator().manual_seed(b))  # (B, in) float32
        xd = x.to(w.dtype)
        fns: dict[str, Callable[[], Any]] = {"dense": _cycler(lambda m: torch.nn.functional.linear(xd, m), dense_ws)}
        for f, mods in sparse_ws.items():
            tile = tile_for(mods[0].weight_format, b)[0]  # measured (or cached) once, then fixed on every copy
            for m in mods:
                m.lanes_tile = tile
            tiles[f][b] = tile.label
            fns[f] = _cycler(lambda m: m(xd), mods)  # the activations the model passes: bf16 for a bf16 layer
        for attempt in range(ATTEMPTS):  # re-measure, with twice the budget each time, what is not yet clear
            with torch.inference_mode():
                meas = time_interleaved(fns, budget_s=budget_s * 2**attempt, rel_tol=REL_TOL)
            speed = {f: meas.ratio("dense", f) for f in sparse}  # (median, low, high) of dense / format
            suspicious = {f for f in sparse if speed[f][0] > bound[f]}
            contenders = [f for f in sparse if f not in suspicious and speed[f][0] >= min_speedup]
            unclear = [f for f in contenders if not meas.stable and speed[f][1] <= 1.0]
            if not suspicious and not unclear and not _close_call(meas, contenders, speed):
                break
        implausible |= suspicious
        for f, t in meas.ms().items():
            timings[f][b] = t
        for f in sparse:
            speedups[f][b] = speed[f][0]
            settled[f] = settled[f] and (meas.stable or speed[f][1] > 1.0)
    mean_ratio = {f: statistics.fmean(speedups[f].values()) for f in sparse if f not in implausible}
    best = max(mean_ratio, key=mean_ratio.get, default=None)
    notes = []
    if implausible:
        names = ", ".join(sorted(implausible))
        notes.append(f"{names} dropped: measured faster than their bytes allow (> "
                     f"{min(bound[f] for f in implausible):.2f}x dense) {ATTEMPTS} times; the machine was too busy to measure them")
    choice = "dense"
    if best is not None and mean_ratio[best] >= min_speedup:
        if settled[best]:
            choice = best
        else:
            notes.append(f"kept dense: {best} measured {mean_ratio[best]:.2f}x but within the noise of an "
                         "unsettled machine (too noisy to decide)")
    return LayerAdvice(tuple(w.shape), float(1 - keep.float().mean()), str(w.dtype).replace("torch.", ""),
                       timings, choice, pattern=_candidate_pattern(choice, pattern), note="; ".join(notes),
                       paired=speedups, tiles={b: t for b, t in tiles.get(choice, {}).items() if b >= LANES_MIN_BATCH})


def _close_call(meas, contenders: list[str], speed: dict[str, tuple[float, float, float]]) -> bool:
    """True when, on an unsettled machine, the two fastest contenders are not told apart: the paired
    ratio of the runner-up's time to the leader's has a confidence interval that reaches 1."""
    if meas.stable or len(contenders) < 2:
        return False
    leader, runner_up = sorted(contenders, key=lambda f: speed[f][0], reverse=True)[:2]
    return meas.ratio(runner_up, leader)[1] <= 1.0


def _cycler(call: Callable[[Any], Any], items: list) -> Callable[[], Any]:
    state = {"i": 0}

    def fn():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return call(item)

    return fn


# ------------------------------------------------------------------------------- whole models


def _group_key(w: torch.Tensor, pattern: "Pattern | str | None") -> tuple:
    """Layers measured together: same shape, dtype, sparsity to 1%, and the same answers to "which
    structured formats can hold this mask" (N:M, equal row counts, the recorded block pattern)."""
    from sparseforge.masks import satisfies
    from sparseforge.patterns import FanIn, parse

    keep = w != 0  # (out, in)
    fits = []
    for fmt in ("nm", "bsr"):
        pat = _candidate_pattern(fmt, pattern)
        fits.append(pat is not None and _fits(keep, parse(pat)) and satisfies(keep, pat))
    fits.append(satisfies(keep, FanIn()))
    return (tuple(w.shape), str(w.dtype), round(1.0 - float(keep.float().mean()), 2), tuple(fits))


def _fits(keep: torch.Tensor, pattern) -> bool:
    from sparseforge.patterns import check_fits

    try:
        check_fits(pattern, tuple(keep.shape))
    except ConfigError:
        return False
    return True


def advise_model(model: nn.Module, *, batch_sizes: Sequence[int] = (1,), names: Optional[Iterable[str]] = None,
                 pattern: "Pattern | str | None" = None, formats: Optional[Sequence[str]] = None, budget_s: float = 0.2,
                 min_speedup: float = 1.05, threads: Optional[int] = None, progress: bool = False,
                 values_dtype: Optional[torch.dtype] = None, use_cache: bool = True) -> AdviceReport:
    """Measure the linear layers of ``model`` (or those in ``names``) and pick a format for each.

    Layers are grouped by (shape, dtype, sparsity to 1%, which structured formats fit); each group
    is measured once with its first layer's weights, or read from the per-machine tuning cache when
    this CPU, thread count and library version answered the same question before (``use_cache=False``
    measures afresh and overwrites it). Returns an :class:`AdviceReport` whose ``layers`` lists each
    group with the names it covers.
    """
    check_budget(budget_s)
    from sparseforge.layers import linear_layers, weight_2d

    threads = set_threads(threads)
    all_mods = dict(model.named_modules())
    mods = {n: all_mods[n] for n in linear_layers(model)}
    chosen = list(names) if names is not None else list(mods)
    missing = [n for n in chosen if n not in mods]
    if missing:
        raise ConfigError(f"advise_model: {missing[:3]} are not linear layers of the model")
    groups: dict[tuple, list[str]] = {}
    for n in chosen:
        groups.setdefault(_group_key(weight_2d(mods[n]), pattern), []).append(n)
    report = AdviceReport(machine_info(threads), tuple(int(b) for b in batch_sizes))
    stream = weights_stream(model)
    cache = TuningCache()
    from tqdm.auto import tqdm

    for key, layer_names in tqdm(list(groups.items()), desc="advise", unit="shape", disable=not progress):
        question = {"group": list(key), "pattern": None if pattern is None else str(pattern),
                    "batch_sizes": [int(b) for b in batch_sizes], "formats": None if formats is None else list(formats),
                    "min_speedup": min_speedup, "stream": stream, "values_dtype": str(values_dtype)}
        stored = cache.get("advise_layer", question, threads) if use_cache else None
        if stored is not None:
            adv = LayerAdvice.from_dict(stored)
            adv.cached = True
        else:
            adv = measure_layer(weight_2d(mods[layer_names[0]]), batch_sizes=batch_sizes, pattern=pattern,
                                formats=formats, budget_s=budget_s, min_speedup=min_speedup, stream=stream,
                                values_dtype=values_dtype)
            if not adv.note:  # a noisy or refused measurement is not worth remembering
                cache.put("advise_layer", question, adv.to_dict(), threads)
        adv.layers = layer_names
        report.layers.append(adv)
    return report
