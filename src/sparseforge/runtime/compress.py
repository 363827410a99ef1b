"""Swap pruned linear layers for :class:`~sparseforge.nn.SparseLinear`, in place.

``compress_(model)`` walks every ``nn.Linear`` / transformers ``Conv1D`` (or those named by
``targets``), and replaces each one that is sparse enough with a ``SparseLinear`` in place. Nothing
is skipped silently: the returned :class:`CompressReport` lists every converted layer (format,
sparsity, bytes) and every layer kept dense with the reason (below ``min_sparsity``, ignored, tied
to another parameter, unsupported dtype).

``format="auto"`` measures: :func:`sparseforge.runtime.advise.advise_model` times every eligible layer shape
dense and in each sparse format on this machine at the given ``batch_sizes`` and keeps the fastest,
leaving a layer dense (reported, with the timings) when no sparse format wins. ``format="rule"`` is
the fixed, measurement-free rule of :mod:`sparseforge.formats.rule` (recorded N:M -> ``nm``,
>= 85% sparse -> ``csr``, obeys 2:4 -> ``nm``, else ``bitmap``), reproducible across machines; before
it, a recorded ``Block(h, w)`` / ``FanIn`` pattern (``pattern=`` or the model's ``sparsity_config``)
that a layer's zeros obey maps the layer to ``bsr`` / ``fanin``.

Loading a compressed checkpoint straight into SparseLinear layers is
:func:`sparseforge.io.loading.load_sparse`.

Example:
    >>> import torch
    >>> from sparseforge.runtime.compress import compress_
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(torch.tensor([1., 0., 0., 0.] * 2))   # 75% zeros, obeys 2:4
    >>> report = compress_(net, format="rule")
    >>> [(c.name, c.format) for c in report.converted], report.kept_dense
    ([('0', 'nm 2:4')], [('1', 'sparsity 0.000 < min_sparsity 0.300')])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from sparseforge.config import name_matches
from sparseforge.errors import ConfigError, SparseforgeError
from sparseforge.formats.rule import auto_format, structured_format
from sparseforge.layers import is_linear, linear_layers, set_module, weight_2d
from sparseforge.formats import registry
from sparseforge.nn.sparse_linear import SparseLinear
from sparseforge.ops.int8 import INT8_ACT_FORMATS, check_activations
from sparseforge.patterns import NM, Pattern, parse
from sparseforge.runtime.tiles import measure_tiles_

if TYPE_CHECKING:
    from sparseforge.runtime.advise import AdviceReport

__all__ = ["compress_", "CompressReport", "CompressedLayer", "values_dtype", "set_activation_precision_"]

@dataclass
class CompressedLayer:
    name: str
    format: str  # "bitmap", "csr" or "nm 2:4"
    shape: tuple[int, int]  # (out, in)
    sparsity: float  # fraction of zeros in the dense weight
    nbytes: int  # stored format bytes
    dense_bytes: int  # the dense weight's bytes
    activations: str = "float"  # SparseLinear.activations: "float" or "int8"


@dataclass
class CompressReport:
    """What :func:`compress_` did: ``converted`` layers and ``kept_dense`` ``(name, reason)`` pairs."""

    converted: list[CompressedLayer] = field(default_factory=list)
    kept_dense: list[tuple[str, str]] = field(default_factory=list)
    advice: "AdviceReport | None" = field(default=None, repr=False)  # the measurements behind format="auto"
    tiles: dict[str, dict[int, str]] = field(default_factory=dict)  # layer -> {batch bucket: lanes tile label}

    def summary(self) -> str:
        stored = sum(c.nbytes for c in self.converted)
        dense = sum(c.dense_bytes for c in self.converted)
        lines = [f"compressed {len(self.converted)} layer(s): {dense / 2**20:.1f} MiB dense -> {stored / 2**20:.1f} MiB"]
        lines += [f"  {c.name}: {c.format} {c.shape[0]}x{c.shape[1]} sparsity {c.sparsity:.3f}"
                  + (f", {c.activations} activations" if c.activations != "float" else "") for c in self.converted]
        lines += [f"  kept dense {n}: {why}" for n, why in self.kept_dense]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = {"converted": [asdict(c) for c in self.converted], "kept_dense": [list(k) for k in self.kept_dense],
               "tiles": {n: {str(b): t for b, t in tiles.items()} for n, tiles in self.tiles.items()}}
        if self.advice is not None:
            out["advice"] = self.advice.to_dict()
        return out


def _recorded_pattern(model: nn.Module, pattern) -> "Pattern | None":
    if pattern is None:
        block = getattr(getattr(model, "config", None), "sparsity_config", None)
        pattern = block.get("pattern") if isinstance(block, dict) else None
    return parse(pattern) if pattern is not None else None


def _select(model: nn.Module, targets: Optional[list[str]], ignore: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(names to consider, ignored linears with reasons). Errors for targets that are not linear."""
    modules = dict(model.named_modules())
    if targets is None:
        names = list(linear_layers(model))
    else:
        if isinstance(targets, str):
            raise ConfigError("targets must be a list of module-name patterns, not a string")
        names = []
        for pat in targets:
            hits = [n for n, m in modules.items() if n and name_matches(n, pat)]
            linear = [n for n in hits if is_linear(modules[n])]
            if not linear:
                what = f"matches only {[f'{n} ({type(modules[n]).__name__})' for n in hits[:3]]}" if hits else "matches no module"
                raise ConfigError(f"target {pat!r} {what}; compress_ replaces nn.Linear / Conv1D layers only")
            names += [n for n in linear if n not in names]
        names = [n for n in modules if n in names]  # model order
    chosen, ignored = [], []
    for n in names:
        hit = next((p for p in ignore if name_matches(n, p)), None)
        if hit is None:
            chosen.append(n)
        else:
            ignored.append((n, f"matches ignore pattern {hit!r}"))
    return chosen, ignored


def _tied_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(p.data_ptr(), []).append(name)
    return owners


def values_dtype(mod: nn.Module, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The values dtype a layer is compressed to: ``dtype`` if given, else int8 for a layer quantized by
    :mod:`sparseforge.quant` (it has a ``weight_scale`` buffer), else its weight's own dtype."""
    if dtype is not None:
        return dtype
    return torch.int8 if isinstance(getattr(mod, "weight_scale", None), torch.Tensor) else weight_2d(mod).dtype


def _eligible(model: nn.Module, names: list[str], dtype: Optional[torch.dtype], min_sparsity: float,
              report: CompressReport) -> list[tuple[str, float]]:
    """``(name, sparsity)`` of the layers to convert; the others go to ``report.kept_dense`` with the reason
    (weight tied to another parameter, a dtype without kernels, too few zeros)."""
    modules = dict(model.named_modules())
    owners = _tied_owners(model)
    eligible = []
    for name in names:
        mod = modules[name]
        tied = [o for o in owners.get(mod.weight.data_ptr(), []) if o != f"{name}.weight"]
        if tied:
            report.kept_dense.append((name, f"weight is tied to {tied[0]}; compressing it would untie them"))
            continue
        w = weight_2d(mod)  # (out, in) view
        if values_dtype(mod, dtype) not in (torch.float32, torch.bfloat16, torch.int8):
            report.kept_dense.append((name, f"weight dtype {w.dtype} has no sparse kernel; pass dtype=torch.float32, torch.bfloat16 or torch.int8"))
            continue
        sparsity = float((w == 0).sum()) / max(1, w.numel())
        if sparsity < min_sparsity:
            report.kept_dense.append((name, f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity:.3f}"))
            continue
        eligible.append((name, sparsity))
    return eligible


def _choose(name: str, w: torch.Tensor, format: str, advice: "AdviceReport | None", recorded: "Pattern | None",
            report: CompressReport, int8: bool = False) -> "tuple[str, Pattern | str | None] | None":
    """``(format, pattern)`` a layer is built in, or ``None`` (kept dense, reason in ``report``) when the
    measured advice says dense is faster. ``recorded``: the model's recorded pattern, if any; ``int8``:
    the layer's values are int8 (only formats that hold them)."""
    if format == "auto":
        adv = advice.choice_for(name)
        if adv is None:
            raise ConfigError(f"the advice passed to compress_ does not cover layer {name}; measure this model with advise_model")
        if adv.choice == "dense":
            report.kept_dense.append((name, f"dense is faster on this machine ({adv.reason()})"))
            return None
        if int8 and adv.choice not in registry.int8_names():
            return "bitmap", None  # advice measured with float values: no int8 fan-in / BSR
        return adv.choice, adv.pattern
    nm = recorded if isinstance(recorded, NM) else None
    if format == "rule":
        if int8:  # the rule among the formats that hold int8 values (no fan-in / BSR)
            choice = auto_format(w, nm)
            return choice if choice[0] in registry.int8_names() else ("bitmap", None)
        return structured_format(w, recorded) or auto_format(w, nm)
    return format, {"nm": nm, "bsr": recorded}.get(format)


def compress_(
    model: nn.Module,
    format: str = "auto",
    targets: Optional[list[str]] = None,
    ignore: Optional[list[str]] = None,
    *,
    min_sparsity: float = 0.3,
    pattern: "Pattern | str | None" = None,
    dtype: Optional[torch.dtype] = None,
    batch_sizes: tuple[int, ...] = (1,),
    advice: "AdviceReport | None" = None,
    compute_dtype: torch.dtype = torch.float32,
    activations: str = "float",
    tile_batches: tuple[int, ...] = (64,),
    tile_budget_s: float = 0.05,
) -> CompressReport:
    """Replace pruned linear layers of ``model`` with :class:`SparseLinear`, in place.

    Args:
        format: ``"auto"`` (measured, module doc), ``"rule"`` (:func:`~sparseforge.formats.rule.auto_format`), or one format of
            the registered formats (:func:`sparseforge.formats.registry.names`: ``"bitmap"``, ``"nm"``,
            ``"csr"``, ``"fanin"``, ``"bsr"``) for every layer.
        targets: module-name globs (or ``"re:..."``); ``None`` = every linear layer. A target that
            matches no linear layer is a :class:`ConfigError`.
        ignore: module-name globs left dense (reported).
        min_sparsity: layers with a smaller fraction of zeros stay dense (reported).
        pattern: the N:M pattern for ``"nm"`` / tried first by ``"auto"``; the block pattern
            (``"block4x4"``) that ``"bsr"`` needs; default the model's recorded
            ``config.sparsity_config["pattern"]``, else 2:4 for ``"nm"``. Under ``"rule"``, a
            ``Block`` / ``FanIn`` pattern that a layer obeys maps it to ``"bsr"`` / ``"fanin"``.
        dtype: values dtype (float32 / bfloat16 / int8); default each weight's own, except that a
            layer quantized by :mod:`sparseforge.quant` (it has a float32 ``weight_scale`` buffer of
            shape (out,)) gets int8 values on that grid. ``torch.int8`` quantizes the other layers
            round-to-nearest with one scale per output row (:mod:`sparseforge.formats.quantized`);
            int8 layers use the bitmap, N:M or CSR format (``"rule"`` / ``"auto"`` pick among those).
        batch_sizes: batch sizes (tokens per call) ``"auto"`` measures at; pick the ones you serve.
        advice: an :class:`~sparseforge.runtime.advise.AdviceReport` already measured for this model
            (``"auto"`` then measures nothing).
        compute_dtype: ``torch.bfloat16`` runs batches >= 16 of every converted layer through the bf16
            product (:meth:`SparseLinear.set_compute_dtype`; bitmap, N:M and CSR layers only).
        activations: ``"int8"`` quantizes the input of every converted bitmap / N:M layer with int8 values
            per token (:meth:`SparseLinear.set_activation_precision`; inference only, error in
            ``docs/kernels.md``); needs int8 values (``dtype=torch.int8`` or a model quantized by
            :mod:`sparseforge.quant`). Layers stored as CSR keep float activations, which
            :meth:`CompressReport.summary` shows (``CompressedLayer.activations``). Default ``"float"``.
        tile_batches: batch sizes whose bucket (16 / 32 / 48 / 64 rows) gets its lanes-kernel tile measured
            now, once per distinct layer question (:func:`sparseforge.runtime.tiles.measure_tiles_`,
            ``tile_budget_s`` per candidate), so that no forward times anything; ``()`` measures none (the
            forwards then use the tuning cache's answers or the built-in rule). Default 64: the bucket of every
            prefill of 49+ tokens and of batched serving; ``BUCKETS`` (16, 32, 48, 64) measures all four.
    Returns:
        :class:`CompressReport`. All layers are built before any is swapped, so an error (e.g.
        ``format="nm"`` on a weight that is not N:M) leaves the model unchanged.
    """
    if format not in ("auto", "rule") and format not in registry.names(sparse_linear=True):
        raise ConfigError(f"unknown format {format!r}; use 'auto', 'rule' or one of {registry.names(sparse_linear=True)}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ConfigError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if check_activations(activations) != "float" and dtype not in (None, torch.int8):
        raise ConfigError(f"activations={activations!r} needs int8 values; pass dtype=torch.int8 (or leave dtype "
                          "unset on a model quantized by sparseforge.quant)")
    recorded_any = _recorded_pattern(model, pattern)  # NM, Block, FanIn, ...
    recorded = recorded_any if isinstance(recorded_any, NM) else None
    names, kept = _select(model, targets, list(ignore or []))
    modules = dict(model.named_modules())
    report = CompressReport(kept_dense=list(kept))
    eligible = _eligible(model, names, dtype, min_sparsity, report)
    if format == "auto" and advice is None and eligible:
        from sparseforge.runtime.advise import advise_model

        int8_any = any(values_dtype(modules[n], dtype) == torch.int8 for n, _ in eligible)
        advice = advise_model(model, names=[n for n, _ in eligible], batch_sizes=batch_sizes,
                              pattern=recorded, values_dtype=torch.int8 if dtype is None and int8_any else dtype)
    report.advice = advice
    built: dict[str, SparseLinear] = {}
    for name, sparsity in eligible:
        mod = modules[name]
        w = weight_2d(mod)  # (out, in) view
        layer_dtype = values_dtype(mod, dtype)
        choice = _choose(name, w, format, advice, recorded_any, report, int8=layer_dtype == torch.int8)
        if choice is None:
            continue
        try:
            sl = SparseLinear.from_linear(mod, choice[0], pattern=choice[1], dtype=layer_dtype,
                                          compute_dtype=compute_dtype)
        except SparseforgeError as exc:
            raise type(exc)(f"layer {name}: {exc}") from exc
        if activations != "float" and _int8_act_capable(sl):
            sl.set_activation_precision(activations)
        built[name] = sl
        report.converted.append(CompressedLayer(name, registry.label(sl.weight_format), tuple(w.shape), sparsity,
                                                sl.weight_format.nbytes, w.numel() * w.element_size(), sl.activations))
    if activations != "float" and built and not any(sl.activations == activations for sl in built.values()):
        raise ConfigError(f"activations={activations!r}: no converted layer has int8 values in the "
                          f"{' or '.join(INT8_ACT_FORMATS)} format; pass dtype=torch.int8 and format 'nm' / 'bitmap' / 'rule'")
    for name, sl in built.items():
        set_module(model, name, sl)
    report.tiles = measure_tiles_(model, tile_batches, budget_s=tile_budget_s, names=built)
    return report


def _int8_act_capable(layer: SparseLinear) -> bool:
    weight = layer.weight_format
    return weight.dtype == torch.int8 and registry.spec_of(weight).kernel_family in INT8_ACT_FORMATS


def set_activation_precision_(model: nn.Module, activations: str, ignore: Optional[list[str]] = None) -> list[str]:
    """Set :meth:`SparseLinear.set_activation_precision` on every SparseLinear of ``model`` that has the
    mode (int8 values, bitmap / N:M), in place; returns their names. ``"float"`` resets every layer.
    ``ignore``: module-name globs (or ``"re:..."``) set to ``"float"`` instead, e.g. ``["*down_proj"]`` for
    the layers whose inputs carry outliers (``benchmarks/bench_int8_activation_error.py`` names them).

    Raises:
        ConfigError: ``activations`` is not a mode, or is ``"int8"`` and no layer has int8 values in the
        bitmap / N:M format (e.g. a checkpoint pruned without ``--quantize int8``).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.mul_(torch.tensor([1., 0.] * 4))
        >>> _ = compress_(net, format="nm", dtype=torch.int8)
        >>> set_activation_precision_(net, "int8")
        ['0']
    """
    check_activations(activations)
    if isinstance(ignore, str):
        raise ConfigError("ignore must be a list of module-name patterns, not a string")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    ignored = {n for n, _ in layers if any(name_matches(n, pat) for pat in ignore or [])}
    for n, m in layers:
        if n in ignored:
            m.set_activation_precision("float")
    layers = [(n, m) for n, m in layers if n not in ignored]
    chosen = [(n, m) for n, m in layers if activations == "float" or _int8_act_capable(m)]
    if activations != "float" and not chosen:
        raise ConfigError(f"activations={activations!r} needs SparseLinear layers with int8 values in the "
                          f"{' or '.join(INT8_ACT_FORMATS)} format; this model has {len(layers)} SparseLinear layer(s) "
                          "and none qualifies (prune with --quantize int8, or compress_ with dtype=torch.int8)")
    for _, m in chosen:
        m.set_activation_precision(activations)
    return [n for n, _ in chosen]
