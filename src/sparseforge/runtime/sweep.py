"""Speedup versus sparsity on this machine: random weights of given shapes, every format, a table and a plot.

``sparseforge advise MODEL`` appends this sweep to its per-layer report (``--no-sweep`` skips it);
:func:`plot_sweep` draws one panel per shape and batch size (matplotlib PNG).

Example:
    >>> from sparseforge.runtime.sweep import sweep
    >>> rep = sweep([(32, 64)], sparsities=(0.9,), nm=None, budget_s=0.001, stream=False)
    >>> [(r["label"], sorted(r["speedup"])) for r in rep.sweep]
    [('90%', ['bitmap', 'csr'])]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from sparseforge.errors import ConfigError
from sparseforge.patterns import DEFAULT_NM
from sparseforge.runtime.advice import AdviceReport
from sparseforge.runtime.advise import check_budget, measure_layer
from sparseforge.runtime.machine import machine_info, set_threads

__all__ = ["sweep", "plot_sweep", "SWEEP_SPARSITIES"]

SWEEP_SPARSITIES = (0.5, 0.75, 0.9, 0.95)


def sweep(shapes: Iterable[tuple[int, int]], *, batch_sizes: Sequence[int] = (1,),
          sparsities: Sequence[float] = SWEEP_SPARSITIES, nm: Optional[str] = str(DEFAULT_NM), budget_s: float = 0.2,
          threads: Optional[int] = None, stream: bool = True, progress: bool = False,
          report: Optional[AdviceReport] = None) -> AdviceReport:
    """Speedup of each format over dense for random ``(out, in)`` weights at each sparsity.

    Masks come from :func:`sparseforge.masks.mask_from_scores` on the weights' magnitudes
    (unstructured per layer, and the ``nm`` pattern). Rows are appended to ``report.sweep`` with
    ``shape``, ``batch``, ``label`` ("50%" or "2:4"), ``sparsity``, ``dense_ms``, ``ms`` and ``speedup``.
    ``stream`` times the weights read from memory (:func:`sparseforge.runtime.advise.measure_layer`);
    for a model's own shapes pass :func:`sparseforge.runtime.advise.weights_stream` of that model.
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
