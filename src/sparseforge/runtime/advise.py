"""Will sparse be faster on *this* machine? Measure it: the advisor behind ``format="auto"``.

Speedups from sparsity depend on the CPU (SIMD width, cache sizes, memory bandwidth), the thread
count, the layer shape, the batch size and the sparsity. Rules of thumb get it wrong, so the
advisor times the candidates on the machine it runs on:

* :func:`measure_layer` times one pruned ``(out, in)`` weight as the dense product
  (``torch.nn.functional.linear`` in the weight's dtype, float32 activations) and as every sparse
  format that can hold it (:func:`sparseforge.formats.registry.names`; a format whose
  ``from_dense`` refuses the mask is not a candidate), at each batch size, and picks the fastest.
  *Dense* is chosen unless a sparse format is at least ``min_speedup`` times faster, averaged over
  the batch sizes.
* :func:`advise_model` does that for every linear layer of a model, once per distinct
  (shape, dtype, pattern, sparsity to 1%) group, using the first layer of each group's own weights.
  :func:`sparseforge.runtime.compress.compress_` with ``format="auto"`` follows its choices.
* :func:`sweep` times random weights of each distinct shape pruned to a list of sparsities
  (unstructured by magnitude, plus 2:4) for the speedup-vs-sparsity table and plot
  (:func:`plot_sweep`, matplotlib PNG).

Timing protocol: each candidate is called until ``budget_s`` seconds have passed (at least 5
calls, after 2 warm-up calls), candidates interleaved round by round so drifting load from other
processes hits all of them alike, and the median call time is reported. When the model's linear
weights do not fit in this machine's last-level cache
(:func:`sparseforge.runtime.machine.last_level_cache`), each candidate cycles through enough copies of the
weight (>= :data:`STREAM_BYTES`) that it is read from memory as in a real forward pass, rather than
from cache. Threads: torch and the sparse kernels both use ``threads`` (default torch's current
count).

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from sparseforge.errors import ConfigError
from sparseforge.patterns import DEFAULT_NM, Pattern
from sparseforge.runtime.machine import last_level_cache, machine_info, set_threads

__all__ = ["LayerAdvice", "AdviceReport", "measure_layer", "advise_model", "sweep", "plot_sweep", "check_budget",
           "STREAM_BYTES", "SWEEP_SPARSITIES"]

STREAM_BYTES = 96 << 20  # weight copies cycled per candidate when the model does not fit in cache
SWEEP_SPARSITIES = (0.5, 0.75, 0.9, 0.95)


@dataclass
class LayerAdvice:
    """Measured median milliseconds per call: ``timings[format][batch]``; ``choice`` is the winner."""

    shape: tuple[int, int]  # (out, in)
    sparsity: float
    dtype: str
    timings: dict[str, dict[int, float]]
    choice: str  # "dense" or a format name
    pattern: Optional[str] = None  # the pattern the chosen format is built with (nm: N:M, bsr: block), else None
    layers: list[str] = field(default_factory=list)

    def speedup(self, fmt: Optional[str] = None) -> dict[int, float]:
        """Dense time / ``fmt`` time (default the choice) per batch size."""
        fmt = fmt or self.choice
        return {b: self.timings["dense"][b] / t for b, t in self.timings[fmt].items()}

    def reason(self) -> str:
        parts = ", ".join(f"batch {b}: dense {self.timings['dense'][b]:.3f} ms" +
                          "".join(f" / {f} {t[b]:.3f}" for f, t in self.timings.items() if f != "dense")
                          for b in sorted(self.timings["dense"]))
        return f"measured on this machine: {parts}"


@dataclass
class AdviceReport:
    """Per-layer choices (:func:`advise_model`) and the optional sparsity sweep (:func:`sweep`)."""

    machine: dict[str, Any]
    batch_sizes: tuple[int, ...]
    layers: list[LayerAdvice] = field(default_factory=list)
    sweep: list[dict[str, Any]] = field(default_factory=list)

    def choice_for(self, name: str) -> Optional[LayerAdvice]:
        return next((a for a in self.layers if name in a.layers), None)

    def table(self) -> str:
        llc = self.machine.get("llc_bytes")
        lines = [f"machine: {self.machine['cpu']}, kernels {self.machine['isa']}, {self.machine['threads']} thread(s)"
                 + (f", last-level cache {llc / 2**20:.0f} MiB ({self.machine.get('llc_source')})" if llc else "")]
        if self.layers:
            lines.append("\nper-layer choice (median ms per call; speedup = dense / chosen):")
            lines.append("| layers | shape | sparsity | batch | dense ms | " +
                         " | ".join(f"{f} ms" for f in self._formats(self.layers)) + " | choice | speedup |")
            lines.append("|---|---|---:|---:|---:|" + "---:|" * len(self._formats(self.layers)) + "---|---:|")
            for a in self.layers:
                for b in self.batch_sizes:
                    cells = " | ".join(f"{a.timings[f][b]:.3f}" if f in a.timings else "-" for f in self._formats(self.layers))
                    names = a.layers[0] + (f" (+{len(a.layers) - 1})" if len(a.layers) > 1 else "")
                    label = f"{a.choice} {a.pattern}" if a.pattern else a.choice
                    lines.append(f"| {names} | {a.shape[0]}x{a.shape[1]} | {a.sparsity:.2f} | {b} | "
                                 f"{a.timings['dense'][b]:.3f} | {cells} | {label} | {a.speedup()[b]:.2f}x |")
        if self.sweep:
            lines.append("\nspeedup vs dense by sparsity (random weights, magnitude masks; >1 = sparse is faster):")
            fmts = sorted({f for row in self.sweep for f in row["speedup"]})
            lines.append("| shape | batch | sparsity | " + " | ".join(fmts) + " |")
            lines.append("|---|---:|---|" + "---:|" * len(fmts))
            for row in self.sweep:
                cells = " | ".join(f"{row['speedup'][f]:.2f}x" if f in row["speedup"] else "-" for f in fmts)
                lines.append(f"| {row['shape'][0]}x{row['shape'][1]} | {row['batch']} | {row['label']} | {cells} |")
        return "\n".join(lines)

    @staticmethod
    def _formats(layers: Iterable[LayerAdvice]) -> list[str]:
        return sorted({f for a in layers for f in a.timings if f != "dense"})

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "batch_sizes": list(self.batch_sizes),
                "layers": [asdict(a) for a in self.layers], "sweep": self.sweep}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdviceReport":
        """Inverse of :meth:`to_dict` (JSON turns the batch-size keys into strings; they come back as ints)."""
        layers = [LayerAdvice(**{**a, "shape": tuple(a["shape"]),
                                 "timings": {f: {int(b): t for b, t in v.items()} for f, v in a["timings"].items()}})
                  for a in d.get("layers", [])]
        return cls(d["machine"], tuple(d["batch_sizes"]), layers, list(d.get("sweep", [])))


# ------------------------------------------------------------------------------------ timing


def check_budget(budget_s: float) -> None:
    """ConfigError unless ``budget_s`` (seconds of calls per candidate) is a finite number >= 0."""
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not math.isfinite(budget_s) or budget_s < 0:
        raise ConfigError(f"--budget (seconds of calls per candidate) must be a finite number >= 0, got {budget_s!r}")


def _time_interleaved(fns: dict[str, Callable[[], Any]], budget_s: float) -> dict[str, float]:
    """Median ms per call of each function, called round-robin until ``budget_s`` per function."""
    for fn in fns.values():
        fn(), fn()  # warm-up: thread pools, allocator, caches of the op dispatcher
    samples: dict[str, list[float]] = {k: [] for k in fns}
    spent = 0.0
    while spent < budget_s * len(fns) or min(len(s) for s in samples.values()) < 5:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            samples[name].append(dt)
            spent += dt
        if min(len(s) for s in samples.values()) >= 2000:
            break
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


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
    """{format: SparseLinear} for every format that can hold the masked weight, and the masked weight."""
    from sparseforge.formats import registry
    from sparseforge.nn.sparse_linear import SparseLinear

    known = registry.names()
    wanted = list(formats or known)
    unknown = [f for f in wanted if f not in known]
    if unknown:
        raise ConfigError(f"unknown format(s) {unknown}; the advisor knows {known}")
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(torch.where(keep, w, torch.zeros((), dtype=w.dtype)), requires_grad=False)
    out = {}
    for fmt in wanted:
        try:
            out[fmt] = SparseLinear.from_linear(lin, fmt, pattern=_candidate_pattern(fmt, pattern), dtype=values_dtype)
        except ConfigError:
            continue  # the format cannot hold this mask (not N:M, rows of unequal length, no block pattern)
    return out, lin.weight.detach()


def measure_layer(w: torch.Tensor, *, batch_sizes: Sequence[int] = (1,), pattern: "Pattern | str | None" = None,
                  formats: Optional[Sequence[str]] = None, budget_s: float = 0.2, min_speedup: float = 1.05,
                  stream: bool = False, values_dtype: Optional[torch.dtype] = None) -> LayerAdvice:
    """Time a pruned ``(out, in)`` weight (zeros = pruned) dense and in each sparse format.

    Args:
        pattern: the layer's recorded pattern: an N:M one is used for the ``nm`` candidate (default
            2:4, if the weight obeys it), a block one for ``bsr``.
        formats: candidate formats (default every registered format, :func:`sparseforge.formats.registry.names`;
            those that cannot hold the mask are skipped).
        budget_s: seconds of calls per candidate and batch size.
        min_speedup: a sparse format is chosen only if dense / sparse time, averaged over the batch
            sizes, reaches this (guards against picking a format on noise).
        stream: cycle through copies of the weight (>= :data:`STREAM_BYTES`) so it is read from
            memory, not cache, as in a model bigger than the cache.
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
    sparse, masked = _candidates(w, keep, pattern, formats, values_dtype)
    copies = max(1, math.ceil(STREAM_BYTES / max(1, masked.numel() * masked.element_size()))) if stream else 1
    dense_ws = [masked.clone() for _ in range(copies)]
    sparse_ws = {f: [m] + [copy.deepcopy(m) for _ in range(copies - 1)] for f, m in sparse.items()}
    timings: dict[str, dict[int, float]] = {"dense": {}, **{f: {} for f in sparse}}
    for b in batch_sizes:
        b = int(b)
        x = torch.randn(b, w.shape[1], generator=torch.Generator().manual_seed(b))  # (B, in) float32
        xd = x.to(w.dtype)
        fns: dict[str, Callable[[], Any]] = {"dense": _cycler(lambda m: torch.nn.functional.linear(xd, m), dense_ws)}
        for f, mods in sparse_ws.items():
            fns[f] = _cycler(lambda m: m(x), mods)
        with torch.inference_mode():
            for f, ms in _time_interleaved(fns, budget_s).items():
                timings[f][b] = ms
    mean_ratio = {f: statistics.fmean(timings["dense"][b] / timings[f][b] for b in timings[f]) for f in sparse}
    best = max(mean_ratio, key=mean_ratio.get, default=None)
    choice = best if best is not None and mean_ratio[best] >= min_speedup else "dense"
    return LayerAdvice(tuple(w.shape), float(1 - keep.float().mean()), str(w.dtype).replace("torch.", ""),
                       timings, choice, pattern=_candidate_pattern(choice, pattern))


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
                 values_dtype: Optional[torch.dtype] = None) -> AdviceReport:
    """Measure the linear layers of ``model`` (or those in ``names``) and pick a format for each.

    Layers are grouped by (shape, dtype, sparsity to 1%); each group is measured once with its first
    layer's weights. Returns an :class:`AdviceReport` whose ``layers`` lists each group with the
    names it covers.
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
    total = sum(weight_2d(mods[n]).numel() * weight_2d(mods[n]).element_size() for n in mods)
    groups: dict[tuple, list[str]] = {}
    for n in chosen:
        groups.setdefault(_group_key(weight_2d(mods[n]), pattern), []).append(n)
    report = AdviceReport(machine_info(threads), tuple(int(b) for b in batch_sizes))
    stream = total > last_level_cache().nbytes  # the model's weights cannot stay in this machine's cache
    from tqdm.auto import tqdm

    for key, layer_names in tqdm(list(groups.items()), desc="advise", unit="shape", disable=not progress):
        adv = measure_layer(weight_2d(mods[layer_names[0]]), batch_sizes=batch_sizes, pattern=pattern,
                            formats=formats, budget_s=budget_s, min_speedup=min_speedup, stream=stream,
                            values_dtype=values_dtype)
        adv.layers = layer_names
        report.layers.append(adv)
    return report


def sweep(shapes: Iterable[tuple[int, int]], *, batch_sizes: Sequence[int] = (1,),
          sparsities: Sequence[float] = SWEEP_SPARSITIES, nm: Optional[str] = str(DEFAULT_NM), budget_s: float = 0.2,
          threads: Optional[int] = None, stream: bool = True, progress: bool = False,
          report: Optional[AdviceReport] = None) -> AdviceReport:
    """Speedup of each format over dense for random ``(out, in)`` weights at each sparsity.

    Masks come from :func:`sparseforge.masks.mask_from_scores` on the weights' magnitudes
    (unstructured per layer, and the ``nm`` pattern). Rows are appended to ``report.sweep`` with
    ``shape``, ``batch``, ``label`` ("50%" or "2:4"), ``sparsity``, ``dense_ms``, ``ms`` and ``speedup``.
    """
    check_budget(budget_s)
    from sparseforge.masks import mask_from_scores
    from sparseforge.patterns import Unstructured, parse

    threads = set_threads(threads)
    if any(not 0.0 < s < 1.0 for s in sparsities):
        raise ConfigError(f"sweep sparsities must be in (0, 1), got {list(sparsities)}")
    report = report or AdviceReport(machine_info(threads), tuple(int(b) for b in batch_sizes))
    points = [(f"{round(s * 100)}%", Unstructured(), s) for s in sparsities]
    if nm:
        pat = parse(nm)
        points.append((str(pat), pat, None))
    from tqdm.auto import tqdm

    todo = [(shape, p) for shape in dict.fromkeys(tuple(s) for s in shapes) for p in points]
    for (out, inp), (label, pat, s) in tqdm(todo, desc="sweep", unit="point", disable=not progress):
        w = torch.randn(out, inp, generator=torch.Generator().manual_seed(out * 7919 + inp))  # (out, in)
        keep = mask_from_scores(w.abs(), pat, s)
        adv = measure_layer(w * keep, batch_sizes=batch_sizes, pattern=nm, budget_s=budget_s, stream=stream)
        for b in batch_sizes:
            report.sweep.append({"shape": [out, inp], "batch": int(b), "label": label, "sparsity": adv.sparsity,
                                 "dense_ms": adv.timings["dense"][b],
                                 "ms": {f: t[b] for f, t in adv.timings.items() if f != "dense"},
                                 "speedup": {f: v[b] for f in adv.timings if f != "dense" for v in [adv.speedup(f)]}})
    return report


def plot_sweep(report: AdviceReport, path: "str | Path") -> Path:
    """Save speedup-vs-sparsity curves (one panel per shape and batch size) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the advisor's plot needs matplotlib: pip install 'sparseforge[bench]'") from exc
    if not report.sweep:
        raise ConfigError("the report has no sweep to plot; run sweep() first (or drop --no-sweep)")
    panels = list(dict.fromkeys((tuple(r["shape"]), r["batch"]) for r in report.sweep))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (shape, batch) in zip(axes.flat, panels):
        pts = [r for r in report.sweep if tuple(r["shape"]) == shape and r["batch"] == batch]
        for fmt in sorted({f for r in pts for f in r["speedup"]}):
            xs = [(r["sparsity"], r["speedup"][fmt]) for r in pts if fmt in r["speedup"] and r["label"].endswith("%")]
            if xs:
                ax.plot(*zip(*xs), marker="o", label=fmt)
            nm_pts = [(r["sparsity"], r["speedup"][fmt]) for r in pts if fmt in r["speedup"] and not r["label"].endswith("%")]
            if nm_pts:
                ax.scatter(*zip(*nm_pts), marker="*", s=90, label=f"{fmt} ({pts[-1]['label']})")
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_title(f"{shape[0]}x{shape[1]}, batch {batch}", fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speedup vs dense")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    m = report.machine
    fig.suptitle(f"sparse vs dense on {m['cpu']} ({m['isa']}, {m['threads']} thread(s))", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
