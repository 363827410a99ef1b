"""Inspect a model directory: per-tensor sparsity, stored format, pattern validity and bytes.

Works on plain Hugging Face checkpoints and on sparseforge ones (dense or compressed). A compressed
checkpoint is first validated exactly as the loaders validate it (against the model built on the
meta device, so transformers is needed for it); no weights of the model are built.

Example:
    >>> from sparseforge.io.inspection import inspect_path, format_report
    >>> report = inspect_path("pruned/")                      # doctest: +SKIP
    >>> report["totals"]["ratio"] < 1                          # doctest: +SKIP
    True
    >>> print(format_report(report))                          # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


import torch

from sparseforge.formats import registry
from sparseforge.io.layout import (
    is_compressed,
    load_state_dict_compressed,
    read_safetensors_header,
    read_sparsity_config,
    weight_files,
)
from sparseforge.io.loading import skeleton
from sparseforge.masks import satisfies
from sparseforge.patterns import parse

__all__ = ["inspect_path", "format_report"]


def _stored_bytes(path: Path) -> dict[str, int]:
    """Data bytes on disk of every stored tensor, by tensor name."""
    sizes = {}
    for file in weight_files(path):
        for name, meta in read_safetensors_header(file).items():
            begin, end = meta["data_offsets"]
            sizes[name] = end - begin
    return sizes


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _skeleton_linears(path: Path) -> tuple[dict[str, bool] | None, str | None]:
    """``{weight name: transposed}`` of the linear layers, from the model built on the meta device."""
    try:
        import transformers

        from sparseforge.layers import linear_weights

        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        cls = getattr(transformers, (config.architectures or [""])[0])
        with torch.device("meta"):
            model = cls(config)
        return linear_weights(model), None
    except Exception as exc:  # reported in the output, never hidden
        return None, (
            f"could not build the model skeleton ({type(exc).__name__}: {exc}); the pattern is checked "
            "along the last dimension of every 2-D tensor with zeros"
        )


def inspect_path(path: "str | Path", pattern: "str | None" = None) -> dict[str, Any]:
    """Describe every tensor of a model directory.

    Args:
        pattern: pattern to check (default: the checkpoint's ``sparsity_config["pattern"]``).
            It is checked on the ``(out, in)`` matrix of every layer listed in the checkpoint's
            ``layers`` block; for a plain checkpoint, of every linear weight with zeros (found by
            building the model on the meta device; if that fails, of every 2-D tensor with zeros
            along its last dimension, and ``notes`` says so).
    Returns:
        ``{"path", "format", "compressed", "pattern", "notes", "layers": [{"name", "shape", "dtype", "format", "numel",
        "nnz", "sparsity", "pattern_ok", "bytes", "dense_bytes"}, ...], "totals": {...}}`` where
        ``nnz`` counts nonzero values (NaN counts), ``pattern_ok`` is ``None`` when not checked
        and ``bytes`` are the tensor data bytes on disk.

    Raises:
        ModelError: ``path`` is not a model directory (or only has ``.bin`` weights), or it fails the
            validation both loaders run (:func:`sparseforge.io.validation.validate_checkpoint`:
            corrupt files, fields of the wrong type, tensors missing, extra or of the wrong shape,
            checksums that do not match), so ``inspect`` accepts exactly what the loaders accept.
    """
    p = Path(path)
    block = read_sparsity_config(p)
    sizes = _stored_bytes(p)  # validates the directory first
    layers_block = (block or {}).get("layers") or {}
    aliases = (block or {}).get("tied") or {}
    if pattern is None and block is not None and block.get("pattern") is not None:
        pattern = block["pattern"]
    pat = parse(pattern) if pattern is not None else None
    notes = []
    linears = None
    if pat is not None and not layers_block:
        linears, note = _skeleton_linears(p)
        notes += [note] if note else []
    # the loaders' validation, against the same meta-device skeleton; raises on any inconsistency
    state = load_state_dict_compressed(p, skeleton(p) if is_compressed(block) else None)
    sums = (block or {}).get("checksums")
    if sums is not None:
        notes.append(f"checksums: {len(sums['tensors'])} tensors verified ({sums['algorithm']})")
    elif block is not None and block.get("format") != "dense":
        notes.append(f"no checksums (format_version {block['format_version']}): damaged tensor data cannot be detected")
    rows = []
    for name, value in state.items():
        if name in aliases:
            continue
        info = layers_block.get(name, {})
        if not isinstance(value, torch.Tensor):  # a packed format object
            fmt = registry.spec_of(value).name  # bitmap, nm, fanin or bsr
            mat = value.to_dense()  # (out, in)
            shape = list(mat.t().shape) if info.get("transposed") else list(mat.shape)
            stored = sum(sizes[k] for k in value.state_dict(f"{name}."))
        else:
            fmt, mat = "dense", value
            if info.get("transposed") or (linears or {}).get(name):
                mat = mat.t()  # (out, in)
            shape, stored = list(value.shape), sizes[name]
        numel = mat.numel()
        nnz = int((mat != 0).sum())
        if layers_block:
            check = name in layers_block
        else:
            check = nnz < numel and (name in linears if linears is not None else mat.dim() == 2)
        check = check and pat is not None and mat.dim() == 2 and mat.is_floating_point()
        rows.append({
            "name": name, "shape": shape, "format": fmt,
            "dtype": str(mat.dtype if isinstance(value, torch.Tensor) else value.dtype).removeprefix("torch."),  # int8: stored
            "numel": numel, "nnz": nnz, "sparsity": 1.0 - nnz / numel if numel else 0.0,
            "pattern_ok": satisfies(mat != 0, pat) if check else None,
            "bytes": stored, "dense_bytes": numel * mat.element_size(),
        })
    totals = {k: sum(r[k] for r in rows) for k in ("numel", "nnz", "bytes", "dense_bytes")}
    totals["sparsity"] = 1.0 - totals["nnz"] / totals["numel"] if totals["numel"] else 0.0
    totals["ratio"] = totals["bytes"] / totals["dense_bytes"] if totals["dense_bytes"] else float("nan")
    totals["file_bytes"] = sum(f.stat().st_size for f in weight_files(p))
    checked = [r["pattern_ok"] for r in rows if r["pattern_ok"] is not None]
    totals["pattern_ok"] = all(checked) if checked else None
    return {
        "path": str(p),
        "format": block.get("format", "dense") if block else "dense",
        "compressed": is_compressed(block),
        "pattern": str(pat) if pat is not None else None,
        "notes": notes,
        "layers": sorted(rows, key=lambda r: _natural(r["name"])),
        "totals": totals,
        "activation": _activation_rows(block),
    }


def _activation_rows(block: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per layer of the (validated) ``activation`` section: name, kind, method, threshold (a
    number, or the mean of per-channel ones with ``channels``), target and calibrated sparsity."""
    rows = []
    for name, e in ((block or {}).get("activation") or {}).get("layers", {}).items():
        t = e["threshold"]
        values = [float(v) for v in (t if isinstance(t, list) else [t])]  # float("inf") reads "inf"
        rows.append({"name": name, "kind": e["kind"], "method": e.get("method"),
                     "threshold": sum(values) / len(values), "channels": len(values) if isinstance(t, list) else None,
                     "sparsity": e.get("sparsity"), "calibrated_sparsity": e.get("calibrated_sparsity")})
    return sorted(rows, key=lambda r: _natural(r["name"]))


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`inspect_path` output, one line per tensor, then totals."""
    ok = {True: "ok", False: "VIOLATED", None: "-"}
    header = ("tensor", "shape", "dtype", "format", "nnz", "sparsity", f"{report['pattern'] or 'pattern'}", "bytes")
    lines = [header]
    for r in report["layers"]:
        lines.append((r["name"], "x".join(map(str, r["shape"])), r["dtype"], r["format"], str(r["nnz"]),
                      f"{r['sparsity']:.1%}", ok[r["pattern_ok"]], _human(r["bytes"])))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = [f"{report['path']}: {report['format']} checkpoint"] + [f"note: {n}" for n in report["notes"]]
    out += ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in lines]
    t = report["totals"]
    out.append(
        f"total: {t['numel']:,} values, {t['nnz']:,} nonzero (sparsity {t['sparsity']:.1%}); "
        f"{_human(t['bytes'])} stored vs {_human(t['dense_bytes'])} dense (ratio {t['ratio']:.3f}); "
        f"weight files {_human(t['file_bytes'])}; pattern {ok[t['pattern_ok']]}"
    )
    out += _format_activation(report.get("activation") or [])
    return "\n".join(out)


def _format_activation(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [("activation-sparse layer", "kind", "method", "threshold", "target", "calibrated")]
    for r in rows:
        t = f"{r['threshold']:.4g}" + (f" (mean of {r['channels']})" if r["channels"] else "")
        lines.append((r["name"], r["kind"], r["method"] or "-", t, pct(r["sparsity"]), pct(r["calibrated_sparsity"])))
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    out = [f"activation sparsity: {len(rows)} layers (thresholds restored by sparseforge.load; 'calibrated' = "
           "fraction of calibration inputs skipped)"]
    return out + ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in lines]
