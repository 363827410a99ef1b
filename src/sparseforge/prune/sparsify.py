"""``sparsify_``: prune a whole model in place with one :class:`~sparseforge.config.SparsifyConfig`.

Methods without calibration (magnitude, uniform allocation) prune each target layer directly.
Calibration-based methods (Wanda, SparseGPT) and OWL allocation run the sequential block-by-block
pipeline of :mod:`sparseforge.prune.sequential`. Every target is validated (pattern fits, finite
weights) before any weight changes, so a bad config never leaves a half-pruned model.

Example:
    >>> import sparseforge as sf                                        # doctest: +SKIP
    >>> from sparseforge.io.models import load_model
    >>> loaded = load_model("builtin")
    >>> report = sf.sparsify_(loaded.model, sf.SparsifyConfig(method="wanda", pattern="2:4"),
    ...                       tokenizer=loaded.tokenizer)
    >>> print(report.summary())
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from sparseforge.config import SparsifyConfig, parse_recipe
from sparseforge.errors import ConfigError, DataError, NumericalError
from sparseforge.layers import find_blocks, select_targets, weight_2d
from sparseforge.masks import resolve_sparsity
from sparseforge.patterns import NM, FanIn, check_fits
from sparseforge.runtime.machine import available_memory_bytes
from sparseforge.prune.sequential import capture_block_inputs, collect_stats, float32_block, propagate
from sparseforge.quant.config import SCALE_BUFFER, QuantConfig, quantization_block
from sparseforge.quant.grid import fake_quantize
from sparseforge.quant.transform import attach_scale

__all__ = ["sparsify_", "apply_recipe_", "SparsifyReport", "LayerReport", "peak_rss_mb", "check_calibration_memory"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _hidden_size(model: nn.Module) -> int:
    """Width of the activations flowing between blocks: ``config.hidden_size``, else the widest linear input."""
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int) and size > 0:
        return size
    widths = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    return max(widths, default=1)


def check_calibration_memory(model: nn.Module, config: SparsifyConfig) -> None:
    """ConfigError if calibrating ``model`` with ``config`` cannot fit in the available memory.

    Calibration keeps every sample's block input and output in float32 at once
    (``2 * samples * seqlen * hidden * 4`` bytes, plus the token ids); this is checked before any
    data is drawn, so ``--samples 100000000`` fails at once instead of after minutes of swapping.
    Configs that need no calibration (magnitude with uniform allocation) always pass.
    """
    from sparseforge.prune.methods import get_method

    if not (get_method(config.method, config.method_options).needs_calibration or config.allocation == "owl"):
        return
    cal = config.calibration
    tokens = cal.samples * cal.seqlen
    need = tokens * (2 * _hidden_size(model) * 4 + 8)
    have = available_memory_bytes()
    if need > have:
        raise ConfigError(
            f"calibration with {cal.samples} samples x {cal.seqlen} tokens needs about {need / 2**30:.1f} GiB "
            f"of activations, but only {have / 2**30:.1f} GiB of memory is available; lower --samples or --seqlen"
        )


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    achieved_sparsity: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SparsifyReport:
    """What :func:`sparsify_` did: per-layer sparsity, wall time and peak RSS."""

    config: SparsifyConfig
    layers: list[LayerReport]
    seconds: float
    peak_rss_mb: float

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all pruned weights."""
        total = sum(l.shape[0] * l.shape[1] for l in self.layers)
        zeros = sum(l.achieved_sparsity * l.shape[0] * l.shape[1] for l in self.layers)
        return zeros / total if total else 0.0

    def sparsity_config(self) -> dict[str, Any]:
        """The ``sparsity_config`` block saved with a checkpoint."""
        return {
            "method": self.config.method,
            "pattern": self.config.pattern,
            "sparsity": self.config.sparsity,
            "allocation": self.config.allocation,
            "targets": [f"{l.name}.weight" for l in self.layers],
            "ignore": list(self.config.ignore),
            **({} if self.config.quantize is None else {"quantization": quantization_block(
                self.config.quantize, [l.name for l in self.layers])}),
        }

    def summary(self) -> str:
        return (
            f"{self.config.method} {self.config.pattern}: {len(self.layers)} layers pruned to "
            f"{self.sparsity:.1%} sparsity in {self.seconds:.1f} s (peak RSS {self.peak_rss_mb:.0f} MiB)"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        return d


def _layer_sparsities(config: SparsifyConfig, targets: list[str], owl: dict[str, float] | None) -> dict[str, float | None]:
    out = {}
    for name in targets:
        value = config.sparsity_for(name, None if owl is None else owl[name])
        out[name] = value
    return out


def _validate(model: nn.Module, config: SparsifyConfig, targets: list[str], sparsities: dict[str, float | None]) -> None:
    pattern = config.pattern_value
    modules = dict(model.named_modules())
    for name in targets:
        w = weight_2d(modules[name])
        check_fits(pattern, tuple(w.shape), name)
        if sparsities[name] is not None or not isinstance(pattern, FanIn):
            try:
                resolve_sparsity(pattern, sparsities[name], w.shape[1])
            except ConfigError as exc:
                raise ConfigError(f"layer {name}: {exc}") from None
        if not torch.isfinite(w).all():
            raise NumericalError(f"layer {name} has NaN or inf weights; fix or reload the model before pruning")


def _calibration_batches(config: SparsifyConfig, calibration, tokenizer) -> list[torch.Tensor]:
    if calibration is None:
        if tokenizer is None:
            raise DataError(
                f"method {config.method!r} needs calibration data: pass tokenizer= (to draw "
                f"{config.calibration.samples} samples from {config.calibration.source!r}) or calibration= token ids"
            )
        from sparseforge.data.calibration import calibration_tokens

        calibration = calibration_tokens(tokenizer, config.calibration)
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        raise DataError("calibration must be a non-empty LongTensor of token ids shaped (samples, seqlen)")
    return list(calibration.long().split(config.calibration.batch_size))


def _prune_layer(method, module: nn.Module, stats, pattern, sparsity, name: str,
                 quant: QuantConfig | None = None) -> tuple[LayerReport, torch.Tensor | None]:
    """Prune one layer (and quantize it: joint inside the method, or RTN after); returns its report and scales."""
    w = weight_2d(module)  # (out, in) view
    result = method.prune(w.float().clone(), stats, pattern, sparsity)
    info = dict(result.info)
    weight, scale = result.weight, info.pop("weight_scale", None)  # joint mode: the method's scales
    if quant is not None and quant.method == "rtn":
        weight, scale = fake_quantize(weight, quant.bits, quant.group_size)
        info["quantization"] = quant.describe()
    w.copy_(weight.to(w.dtype))
    achieved = 1.0 - result.mask.float().mean().item()
    target = sparsity if sparsity is not None else 1.0 - pattern.k / w.shape[1]
    return LayerReport(name, tuple(w.shape), float(target), achieved, info), scale


def _method_options(config: SparsifyConfig) -> dict[str, Any]:
    """The method's options; joint quantization is a SparseGPT option."""
    if config.quantize is not None and config.quantize.method == "joint":
        return {**config.method_options, "quantize": config.quantize}
    return config.method_options


def _check_quantization(model: nn.Module, config: SparsifyConfig, targets: list[str]) -> None:
    """Group sizes fit every target; a quantized layer is only pruned again by a stage that re-quantizes."""
    modules = dict(model.named_modules())
    if config.quantize is None:
        done = [n for n in targets if getattr(modules[n], SCALE_BUFFER, None) is not None]
        if done:
            raise ConfigError(
                f"layer {done[0]} is already quantized ({SCALE_BUFFER}); pruning it again would move its weights "
                "off the integer grid: quantize in the last stage, or give this stage 'quantize' too"
            )
    group = None if config.quantize is None else config.quantize.group_size
    if group is None:
        return
    for name in targets:
        cols = weight_2d(modules[name]).shape[1]
        if cols % group:
            raise ConfigError(f"layer {name}: quantization group_size={group} does not divide in_features={cols}")


def sparsify_(
    model: nn.Module,
    config: SparsifyConfig,
    *,
    calibration: torch.Tensor | None = None,
    tokenizer=None,
    progress: bool = True,
) -> SparsifyReport:
    """Prune ``model`` in place according to ``config``; returns a :class:`SparsifyReport`.

    Args:
        calibration: token ids (samples, seqlen); drawn from ``config.calibration`` with
            ``tokenizer`` when omitted. Unused by magnitude pruning with uniform allocation.
        progress: show a progress bar over blocks.
    """
    from tqdm.auto import tqdm

    from sparseforge.prune.methods import LayerStats, get_method

    if isinstance(config, dict):
        config = SparsifyConfig.from_dict(config)
    start = time.perf_counter()
    method = get_method(config.method, _method_options(config))
    pattern = config.pattern_value
    try:
        block_prefix, blocks = find_blocks(model)
    except Exception:
        if config.targets is None or method.needs_calibration or config.allocation == "owl":
            raise
        block_prefix, blocks = None, None
    targets = select_targets(model, config.targets, config.ignore, block_prefix)
    if config.allocation == "owl" and (isinstance(pattern, NM) or config.sparsity is None):
        raise ConfigError(f"allocation 'owl' needs an adjustable sparsity; pattern {pattern} fixes it. Use 'uniform'")
    _validate(model, config, targets, _layer_sparsities(config, targets, None))
    _check_quantization(model, config, targets)
    modules = dict(model.named_modules())
    needs_data = method.needs_calibration or config.allocation == "owl"

    if not needs_data:
        layers = []
        for n in tqdm(targets, desc=f"{config.method} {pattern}", disable=not progress):
            report, scale = _prune_layer(method, modules[n], None, pattern, config.sparsity_for(n), n, config.quantize)
            if scale is not None:
                attach_scale(modules[n], scale)
            layers.append(report)
        return SparsifyReport(config, layers, time.perf_counter() - start, peak_rss_mb())

    outside = [n for n in targets if not n.startswith(block_prefix + ".")]
    if outside:
        raise ConfigError(
            f"layers {outside[:3]} are outside the repeated blocks '{block_prefix}'; calibration-based "
            "pruning works block by block: add them to ignore, or prune them with method 'magnitude'"
        )
    if calibration is None:
        check_calibration_memory(model, config)
    batches = _calibration_batches(config, calibration, tokenizer)
    per_block = _group_by_block(targets, block_prefix, len(blocks))

    owl = None
    if config.allocation == "owl":
        owl = _owl_allocation(model, blocks, batches, per_block, block_prefix, config, progress)
        _validate(model, config, targets, _layer_sparsities(config, targets, owl))
    sparsities = _layer_sparsities(config, targets, owl)

    inputs = capture_block_inputs(model, blocks, batches)
    layers: list[LayerReport] = []
    scales: list[tuple[nn.Module, torch.Tensor | None]] = []
    bar = tqdm(range(len(blocks)), desc=f"{config.method} {pattern}", unit="block", disable=not progress)
    for b in bar:
        block, names = blocks[b], per_block[b]
        with float32_block(block):
            if names:
                local = _local_names(names, block_prefix, b)
                stats = collect_stats(
                    block, local, inputs, lambda _n, d: LayerStats(d, hessian=method.needs_hessian)
                ) if method.needs_calibration else {n: None for n in local}
                block_modules = dict(block.named_modules())
                for full, short in zip(names, local):
                    report, scale = _prune_layer(method, block_modules[short], stats.pop(short), pattern,
                                                 sparsities[full], full, config.quantize)
                    layers.append(report)
                    scales.append((block_modules[short], scale))
                del stats
            if b + 1 < len(blocks):
                inputs = propagate(block, inputs)
        for module, scale in scales:  # after float32_block: the scales stay float32 in any model dtype
            if scale is not None:
                attach_scale(module, scale)
        scales.clear()
        bar.set_postfix(rss=f"{peak_rss_mb():.0f}MiB")
    return SparsifyReport(config, layers, time.perf_counter() - start, peak_rss_mb())


def _group_by_block(targets: list[str], block_prefix: str, num_blocks: int) -> list[list[str]]:
    groups: list[list[str]] = [[] for _ in range(num_blocks)]
    for name in targets:
        index = int(name[len(block_prefix) + 1 :].split(".", 1)[0])
        groups[index].append(name)
    return groups


def _owl_allocation(model, blocks, batches, per_block, block_prefix, config, progress) -> dict[str, float]:
    """OWL (Yin et al. 2024): per-block sparsity from the dense model's layerwise outlier ratios.

    A block's outlier ratio is the fraction of its Wanda metrics ``|W_ij| * ||X_j||`` (all its
    target layers pooled) above ``owl_threshold`` times their mean.
    """
    from tqdm.auto import tqdm

    from sparseforge.prune.allocation import outlier_ratio, owl_sparsities
    from sparseforge.prune.methods import LayerStats

    inputs = capture_block_inputs(model, blocks, batches)
    ratios = []
    for b in tqdm(range(len(blocks)), desc="OWL outlier ratios", unit="block", disable=not progress):
        block, local = blocks[b], _local_names(per_block[b], block_prefix, b)
        with float32_block(block):
            stats = collect_stats(block, local, inputs, lambda _n, d: LayerStats(d, hessian=False))
            mods = dict(block.named_modules())
            weights = [weight_2d(mods[n]).float() for n in local]
            ratios.append(outlier_ratio(weights, [stats[n].input_sq_norm for n in local], config.owl_threshold))
            if b + 1 < len(blocks):
                inputs = propagate(block, inputs)
    per_block_sparsity = owl_sparsities(ratios, config.sparsity, config.owl_lambda)
    return {n: per_block_sparsity[b] for b, names in enumerate(per_block) for n in names}


def _local_names(names: list[str], block_prefix: str, index: int) -> list[str]:
    """Names relative to block ``index`` (strip ``'<block_prefix>.<index>.'``)."""
    prefix = f"{block_prefix}.{index}."
    return [n[len(prefix):] for n in names]


def apply_recipe_(model: nn.Module, recipe, **kwargs) -> list[SparsifyReport]:
    """Apply every stage of a recipe (YAML text, or a list of configs) in order."""
    configs = parse_recipe(recipe) if isinstance(recipe, str) else list(recipe)
    return [sparsify_(model, c, **kwargs) for c in configs]
