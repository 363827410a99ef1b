"""What the format advisor measured and chose: :class:`LayerAdvice` per layer group, :class:`AdviceReport` per model.

:func:`sparseforge.runtime.advise.advise_model` fills an :class:`AdviceReport`;
:func:`sparseforge.runtime.compress.compress_` follows it; ``sparseforge advise`` prints
:meth:`AdviceReport.table` and saves :meth:`AdviceReport.to_dict` as JSON.

Example:
    >>> from sparseforge.runtime.advice import LayerAdvice
    >>> a = LayerAdvice((8, 8), 0.9, "float32", {"dense": {1: 2.0}, "csr": {1: 1.0}}, "csr")
    >>> a.speedup()
    {1: 2.0}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

__all__ = ["LayerAdvice", "AdviceReport"]


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
    note: str = ""  # why dense was kept although a format measured faster (noise, implausible ratio)
    paired: dict[str, dict[int, float]] = field(default_factory=dict)  # median per-round dense / format time
    cached: bool = False  # read from the per-machine tuning cache instead of measured now
    tiles: dict[int, str] = field(default_factory=dict)  # the chosen format's lanes-kernel tile per batch >= 4

    def speedup(self, fmt: Optional[str] = None) -> dict[int, float]:
        """Dense time / ``fmt`` time (default the choice) per batch size."""
        fmt = fmt or self.choice
        return {b: self.timings["dense"][b] / t for b, t in self.timings[fmt].items()}

    def to_dict(self) -> dict[str, Any]:
        """The measurement (JSON-able; the layer names and ``cached`` flag are left out)."""
        return {k: v for k, v in asdict(self).items() if k not in ("layers", "cached")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerAdvice":
        """Inverse of :meth:`to_dict` (JSON turns batch-size keys into strings; they come back as ints)."""
        per_batch = lambda table: {f: {int(b): t for b, t in v.items()} for f, v in table.items()}  # noqa: E731
        return cls(**{**d, "shape": tuple(d["shape"]), "timings": per_batch(d["timings"]),
                      "paired": per_batch(d.get("paired", {})),
                      "tiles": {int(b): t for b, t in d.get("tiles", {}).items()}})

    def reason(self) -> str:
        parts = ", ".join(f"batch {b}: dense {self.timings['dense'][b]:.3f} ms" +
                          "".join(f" / {f} {t[b]:.3f}" for f, t in self.timings.items() if f != "dense")
                          for b in sorted(self.timings["dense"]))
        where = "measured on this machine (cached)" if self.cached else "measured on this machine"
        return f"{where}: {parts}" + (f"; {self.note}" if self.note else "")


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
                    label += " (cached)" if a.cached else ""
                    lines.append(f"| {names} | {a.shape[0]}x{a.shape[1]} | {a.sparsity:.2f} | {b} | "
                                 f"{a.timings['dense'][b]:.3f} | {cells} | {label} | {a.speedup()[b]:.2f}x |")
        tiled = [a for a in self.layers if a.tiles]
        if tiled:
            lines.append("\nkernel tiles (batch-in-lanes kernels, measured on this machine; rule = the built-in tiles):")
            for a in tiled:
                where = a.layers[0] + (f" (+{len(a.layers) - 1})" if len(a.layers) > 1 else "") if a.layers else str(a.shape)
                lines.append(f"  {where}: {a.choice} " + ", ".join(f"batch {b} {t}" for b, t in sorted(a.tiles.items())))
        notes = [f"  {a.layers[0] if a.layers else a.shape}: {a.note}" for a in self.layers if a.note]
        if notes:
            lines.append("\nnotes:")
            lines += notes
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
        layers = [LayerAdvice.from_dict(a) for a in d.get("layers", [])]
        return cls(d["machine"], tuple(d["batch_sizes"]), layers, list(d.get("sweep", [])))
