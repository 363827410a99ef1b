"""TEAL: training-free activation sparsity by magnitude thresholds on projection inputs.

Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models", arXiv:2408.14690
(reference code: FasterDecoding/TEAL). What this module reproduces:

* Thresholds act on the **input** of every projection inside the repeated blocks (q, k, v, o,
  gate, up, down in a Llama block); each projection has its own threshold even where several share
  one input (q/k/v, gate/up), calibrated from the distribution of that input.
* The distribution is TEAL's histogram: all calibration activations of the input, 10,000 bins
  between the 1% and 99% quantiles plus one overflow bin at each end; the threshold for sparsity
  ``s`` is ``icdf(0.5 + s / 2)`` with linear interpolation between bin centers (``"signed"``; it
  assumes a zero-mean symmetric input) or, with ``distribution="abs"``, ``icdf(s)`` of the same
  histogram built over ``|x|``.
* Calibration activations come from the **dense** model, block by block (as TEAL's grab_acts).
* Greedy allocation (``teal/greedyopt.py``), per block on that block's dense inputs: all
  projections start at 0; each step tries ``+step / w_p`` on every projection (``w_p``: parameter
  count relative to the block's first projection) and keeps the one with the lowest error, until
  the weighted mean ``sum(w_p s_p) / sum(w_p)`` reaches the target; the final sparsities are those of
  the step whose weighted sparsity is closest to the target. The error is TEAL's:
  ``norm(out_dense - out_sparse, dim=positions)`` over the last 25% of positions, averaged over
  sequences and hidden channels, with only the last half of the positions sparsified while
  searching (TEAL's ``SparsifyFn`` in a multi-token forward).

Example:
    >>> from sparseforge.activation.teal import Histogram
    >>> import torch
    >>> h = Histogram.of(torch.linspace(-1, 1, 100001))
    >>> round(h.threshold(0.5), 2)   # half of a uniform [-1, 1] lies in [-0.5, 0.5]
    0.5
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from sparseforge.activation.config import ActivationSparsityConfig
from sparseforge.activation.linear import SparseInputLinear
from sparseforge.errors import ConfigError, DataError, ModelError, NumericalError
from sparseforge.layers import find_blocks, select_targets, set_module
from sparseforge.ops.sparse_input import sparse_input_masked
from sparseforge.sequential import BlockInputs, capture_block_inputs, float32_block

__all__ = [
    "Histogram", "GreedyStep", "LayerThreshold", "ActivationSparsityReport", "sparsify_activations_",
    "greedy_allocation", "set_token_fraction", "sparse_input_layers",
]

NUM_BINS = 10_000
OUTLIER_FRACTION = 0.01


@dataclass
class Histogram:
    """TEAL's activation histogram: bin centers and cumulative counts (float64)."""

    centers: Tensor  # (bins,)
    cumulative: Tensor  # (bins,)

    @classmethod
    def of(cls, values: Tensor, bins: int = NUM_BINS, outlier: float = OUTLIER_FRACTION) -> "Histogram":
        """Histogram of all of ``values``: ``bins - 2`` equal bins between the ``outlier`` and
        ``1 - outlier`` quantiles, one bin from the minimum and one up to the maximum."""
        v = values.detach().reshape(-1).float()  # (n,)
        n = v.numel()
        if n == 0:
            raise DataError("no activations to build a histogram from")
        k = int(outlier * n)
        # TEAL sorts and reads sorted[k] and sorted[n - 1 - k]: the same order statistics
        lower, upper = torch.kthvalue(v, k + 1).values, torch.kthvalue(v, n - k).values
        edges = torch.linspace(float(lower), float(upper), bins - 1, dtype=torch.float64)
        if float(upper) <= float(lower):  # (near) constant input: one bin around the value
            edges = torch.tensor([float(lower) - 0.5, float(lower) + 0.5], dtype=torch.float64)
        lo, hi = float(v.min()), float(v.max())
        parts = [edges]
        if lo < float(edges[0]):
            parts.insert(0, torch.tensor([lo], dtype=torch.float64))
        if hi > float(edges[-1]):
            parts.append(torch.tensor([hi], dtype=torch.float64))
        edges = torch.cat(parts)
        counts, _ = torch.histogram(v.double(), bins=edges)  # (bins,)
        centers = (edges[:-1] + edges[1:]) / 2
        return cls(centers=centers, cumulative=torch.cumsum(counts, 0))

    def icdf(self, q: float) -> float:
        """The value below which a fraction ``q`` of the activations lies (TEAL's interpolation)."""
        total = float(self.cumulative[-1])
        target = q * total
        idx = int(torch.searchsorted(self.cumulative, torch.tensor([target], dtype=torch.float64))[0])
        if idx == 0:
            return float(self.centers[0])
        if idx >= self.centers.numel():
            return float(self.centers[-1])
        lo_c, hi_c = float(self.cumulative[idx - 1]), float(self.cumulative[idx])
        frac = (target - lo_c) / (hi_c - lo_c)
        lo_v, hi_v = float(self.centers[idx - 1]), float(self.centers[idx])
        return lo_v + frac * (hi_v - lo_v)

    def threshold(self, sparsity: float, signed: bool = True) -> float:
        """Threshold giving ``sparsity``: ``icdf(0.5 + s / 2)`` (signed histogram) or ``icdf(s)``
        (histogram of ``|x|``); 0 for sparsity 0."""
        if sparsity <= 0.0:
            return 0.0
        return max(0.0, self.icdf(0.5 + sparsity / 2 if signed else sparsity))


@dataclass
class GreedyStep:
    """One row of the greedy search (TEAL's results.csv): weighted sparsity, error, sparsities."""

    effective: float
    error: float
    sparsities: dict[str, float]


@dataclass
class LayerThreshold:
    name: str
    sparsity: float  # target sparsity of this projection's input
    threshold: float
    calibration_sparsity: float  # fraction of calibration inputs at or under the threshold


@dataclass
class ActivationSparsityReport:
    config: ActivationSparsityConfig
    layers: list[LayerThreshold]
    greedy: dict[int, list[GreedyStep]] = field(default_factory=dict)  # block -> path
    seconds: float = 0.0
    histograms: dict[str, Histogram] = field(default_factory=dict, repr=False)  # layer -> its input's
    block_of: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False)  # layer -> (block, local name)

    def effective_sparsity(self, model: nn.Module) -> float:
        """Skipped fraction of the sparsified layers' weight bytes at the calibrated sparsities."""
        modules = dict(model.named_modules())
        sizes = [modules[t.name].in_features * modules[t.name].out_features for t in self.layers]
        return sum(t.sparsity * n for t, n in zip(self.layers, sizes)) / max(1, sum(sizes))

    def retarget_(self, model: nn.Module, sparsity: float) -> None:
        """Set the thresholds of ``model``'s sparse-input layers for another ``sparsity`` from the
        same calibration (no new data pass): uniform = the histograms at ``sparsity``; greedy =
        each block's step closest to ``sparsity`` on the recorded path (TEAL's lookup), which must
        reach it (calibrate with the highest sparsity you want to try)."""
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"activation sparsity must be in [0, 1), got {sparsity!r}")
        layers = sparse_input_layers(model)
        signed = self.config.distribution == "signed"
        for i, t in enumerate(self.layers):
            if t.name not in layers:
                raise ModelError(f"layer {t.name} of this report is not a SparseInputLinear in the model")
            b, local = self.block_of[t.name]
            if self.config.allocation == "greedy":
                path = self.greedy.get(b, [])
                if sparsity > 0 and (not path or path[-1].effective < sparsity - 1e-9):
                    raise ConfigError(f"block {b}'s greedy path stops at {path[-1].effective if path else 0:.3f} < "
                                      f"{sparsity}; calibrate with sparsity >= {sparsity}")
                s = _closest(path, [local], sparsity)[local] if sparsity > 0 else 0.0
            else:
                s = sparsity
            threshold = self.histograms[t.name].threshold(s, signed)
            layers[t.name].set_threshold(threshold)
            self.layers[i] = LayerThreshold(t.name, s, threshold, float("nan"))

    def summary(self) -> str:
        c = self.config
        return (f"TEAL {c.allocation} activation sparsity {c.sparsity:.0%} on {len(self.layers)} projections "
                f"({c.distribution} histograms) in {self.seconds:.1f}s")


def _projections(model: nn.Module, config: ActivationSparsityConfig) -> tuple[str, nn.ModuleList, list[list[str]]]:
    """(block prefix, blocks, per block the names of its projections relative to the block)."""
    try:
        prefix, blocks = find_blocks(model)
    except ModelError as exc:
        raise ModelError(f"activation sparsity needs repeated transformer blocks with linear projections: {exc}") from exc
    names = select_targets(model, config.targets, config.ignore, prefix)
    modules = dict(model.named_modules())
    per_block: list[list[str]] = [[] for _ in blocks]
    for n in names:
        if not n.startswith(prefix + "."):
            raise ConfigError(f"layer {n} is outside the repeated blocks '{prefix}'; activation sparsity calibrates "
                              "block by block: add it to ignore")
        if not isinstance(modules[n], nn.Linear):
            raise ConfigError(f"layer {n} is a {type(modules[n]).__name__}, not an nn.Linear; sparse-input layers "
                              "replace nn.Linear only: add it to ignore")
        index, _, local = n[len(prefix) + 1:].partition(".")
        per_block[int(index)].append(local)
    if not any(per_block):
        raise ModelError(f"no supported projections (nn.Linear inside '{prefix}') to sparsify in {type(model).__name__}")
    return prefix, blocks, per_block


def _calibration(config: ActivationSparsityConfig, calibration, tokenizer) -> list[Tensor]:
    if calibration is None:
        if tokenizer is None:
            raise DataError("TEAL needs calibration data: pass tokenizer= (to draw "
                            f"{config.calibration.samples} samples from {config.calibration.source!r}) or calibration= token ids")
        from sparseforge.data import calibration_tokens

        calibration = calibration_tokens(tokenizer, config.calibration)
    if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        raise DataError("calibration must be a non-empty LongTensor of token ids shaped (samples, seqlen)")
    if calibration.shape[1] < 2:
        raise DataError(f"calibration sequences need at least 2 tokens, got {calibration.shape[1]}")
    return list(calibration.long().split(config.calibration.batch_size))


def _run_capturing(block: nn.Module, names: list[str], inputs: BlockInputs) -> tuple[dict, list[Tensor]]:
    """Run the dense block on every batch: each projection's inputs and the block's outputs.

    Returns ({name: [x (B, T, in) per batch]}, [outputs (B, T, H) per batch]). Projections fed the
    very same tensor (q/k/v, gate/up) share the tensors (no copies).
    """
    modules = dict(block.named_modules())
    seen: dict[str, list[Tensor]] = {n: [] for n in names}

    def hook(name, module, args):
        seen[name].append(args[0])  # the very tensor (under no_grad): shared inputs stay one object

    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: hook(n, m, a)) for n in names]
    outputs = []
    try:
        with torch.no_grad():
            for i, hidden in enumerate(inputs.hidden):
                outputs.append(inputs.call(block, i, hidden).float())
    finally:
        for h in handles:
            h.remove()
    return seen, outputs


def _check_finite(name: str, xs: list[Tensor]) -> None:
    for x in xs:
        if not torch.isfinite(x).all():
            raise NumericalError(f"layer {name} received NaN/inf activations during calibration; check the model "
                                 "weights and the calibration data (a float16 overflow?)")


class _Masking:
    """Forward pre-hooks masking each projection's input by its threshold on the last half of the
    positions of a multi-token call (TEAL's SparsifyFn while searching)."""

    def __init__(self, block: nn.Module, names: list[str]) -> None:
        modules = dict(block.named_modules())
        self.thresholds = {n: 0.0 for n in names}
        self.handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: self._mask(n, a)) for n in names]

    def _mask(self, name, args):
        t = self.thresholds[name]
        if t <= 0.0:
            return None
        x = args[0]  # (B, T, in)
        half = x.shape[-2] // 2
        if half == 0:
            return (sparse_input_masked(x, torch.tensor([t])), *args[1:])
        head, tail = x[..., : x.shape[-2] - half, :], x[..., x.shape[-2] - half :, :]
        return (torch.cat([head, sparse_input_masked(tail, torch.tensor([t]))], dim=-2), *args[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _greedy_error(targets: list[Tensor], outputs: list[Tensor], last_fraction: float) -> float:
    """TEAL's error: L2 norm over the last positions, averaged over sequences and channels."""
    norms = []
    for t, o in zip(targets, outputs):
        start = int(t.shape[1] * (1 - last_fraction))
        norms.append(torch.linalg.vector_norm(t[:, start:] - o[:, start:], dim=1))  # (B, H)
    return float(torch.cat(norms).mean())


def greedy_allocation(block: nn.Module, names: list[str], inputs: BlockInputs, batches: int, targets: list[Tensor],
                      hists: dict[str, Histogram], config: ActivationSparsityConfig) -> list[GreedyStep]:
    """TEAL's block-wise greedy search (module doc) up to ``config.sparsity``; returns the path."""
    modules = dict(block.named_modules())
    base = modules[names[0]].weight.numel()
    weights = {n: modules[n].weight.numel() / base for n in names}
    total_w = sum(weights.values())
    steps = {n: config.greedy_step / weights[n] for n in names}
    signed = config.distribution == "signed"
    sparsities = {n: 0.0 for n in names}
    masking = _Masking(block, names)

    def effective(s: dict[str, float]) -> float:
        return sum(s[n] * weights[n] for n in names) / total_w

    def error_with(s: dict[str, float]) -> float:
        for n in names:
            masking.thresholds[n] = hists[n].threshold(s[n], signed)
        with torch.no_grad():
            outs = [inputs.call(block, i, inputs.hidden[i]).float() for i in range(batches)]
        return _greedy_error(targets, outs, config.greedy_last_fraction)

    path: list[GreedyStep] = []
    try:
        while effective(sparsities) < config.sparsity:
            best, best_err = None, float("inf")
            for n in names:
                if sparsities[n] >= 1.0:
                    continue
                trial = dict(sparsities)
                trial[n] += steps[n]
                err = error_with(trial)
                if err < best_err:
                    best, best_err = n, err
            if best is None:
                break
            sparsities[best] += steps[best]
            path.append(GreedyStep(effective(sparsities), best_err, dict(sparsities)))
    finally:
        masking.remove()
    return path


def _closest(path: list[GreedyStep], names: list[str], target: float) -> dict[str, float]:
    """The sparsities of the step whose weighted sparsity is closest to ``target`` (TEAL's lookup)."""
    if not path:
        return {n: 0.0 for n in names}
    row = min(path, key=lambda r: abs(r.effective - target))
    return {n: min(row.sparsities[n], 1.0) for n in names}


def sparsify_activations_(model: nn.Module, config: ActivationSparsityConfig, *, calibration: Optional[Tensor] = None,
                          tokenizer=None, progress: bool = True) -> ActivationSparsityReport:
    """Calibrate TEAL thresholds and replace the projections by :class:`SparseInputLinear`, in place.

    Works on an unmodified transformers model (any family with repeated blocks of ``nn.Linear``
    projections): afterwards ``model(...)`` and ``model.generate(...)`` run with sparse inputs.

    Args:
        calibration: token ids ``(samples, seqlen)``; drawn from ``config.calibration`` with
            ``tokenizer`` when omitted.
        progress: a progress bar over blocks.

    Raises:
        ConfigError: bad config, or a selected layer that is not an ``nn.Linear`` in a block.
        ModelError: no repeated blocks / no supported projections.
        DataError: missing or malformed calibration data.
        NumericalError: NaN/inf activations reaching a projection (the message names it).

    Example:
        >>> from sparseforge.activation import ActivationSparsityConfig, sparsify_activations_
        >>> report = sparsify_activations_(model, ActivationSparsityConfig(sparsity=0.4), tokenizer=tok)  # doctest: +SKIP
        >>> model.generate(**tok("To be", return_tensors="pt"), max_new_tokens=8)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if isinstance(config, dict):
        config = ActivationSparsityConfig(**config)
    start = time.perf_counter()
    prefix, blocks, per_block = _projections(model, config)
    batches = _calibration(config, calibration, tokenizer)
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, blocks, batches)
    greedy_batches, count = 0, 0
    while greedy_batches < len(batches) and count < config.greedy_samples:
        count += batches[greedy_batches].shape[0]
        greedy_batches += 1
    signed = config.distribution == "signed"
    layers: list[LayerThreshold] = []
    paths: dict[int, list[GreedyStep]] = {}
    kept_hists: dict[str, Histogram] = {}
    block_of: dict[str, tuple[int, str]] = {}
    replacements: list[tuple[str, float]] = []
    bar = tqdm(range(len(blocks)), desc=f"TEAL {config.allocation} {config.sparsity:.0%}", unit="block",
               disable=not progress)
    for b in bar:
        block, names = blocks[b], per_block[b]
        with float32_block(block):
            seen, outputs = _run_capturing(block, names, inputs)
            hists: dict[str, Histogram] = {}
            by_tensor: dict[int, Histogram] = {}
            for n in names:
                key = id(seen[n][0])  # q/k/v (gate/up) see the same tensors: one histogram
                if key not in by_tensor:
                    _check_finite(f"{prefix}.{b}.{n}", seen[n])
                    values = torch.cat([x.reshape(-1) for x in seen[n]])
                    by_tensor[key] = Histogram.of(values if signed else values.abs())
                hists[n] = by_tensor[key]
            if config.allocation == "greedy" and names:
                path = greedy_allocation(block, names, inputs, greedy_batches, outputs[:greedy_batches], hists, config)
                paths[b] = path
                chosen = _closest(path, names, config.sparsity)
            else:
                chosen = {n: config.sparsity for n in names}
            for n in names:
                t = hists[n].threshold(chosen[n], signed)
                skipped = float(sum((x.abs() <= t).sum() for x in seen[n]) / sum(x.numel() for x in seen[n]))
                full = f"{prefix}.{b}.{n}"
                layers.append(LayerThreshold(full, chosen[n], t, skipped))
                replacements.append((full, t))
                kept_hists[full] = hists[n]
                block_of[full] = (b, n)
            del seen, hists, by_tensor
        inputs.hidden = outputs  # the dense block's outputs feed the next block (TEAL's grab_acts)
    modules = dict(model.named_modules())
    for full, t in replacements:
        set_module(model, full, SparseInputLinear.from_linear(modules[full], threshold=t))
    model.train(was_training)
    return ActivationSparsityReport(config, layers, paths, time.perf_counter() - start, kept_hists, block_of)


def sparse_input_layers(model: nn.Module) -> dict[str, SparseInputLinear]:
    """The model's :class:`SparseInputLinear` layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseInputLinear)}


def set_token_fraction(model: nn.Module, fraction: float) -> None:
    """Sparsify only the last ``fraction`` of the positions of multi-token calls in every
    sparse-input layer (TEAL's evaluation convention is 0.5; 1.0 = every token)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"token fraction must be in [0, 1], got {fraction!r}")
    layers = sparse_input_layers(model)
    if not layers:
        raise ModelError("the model has no SparseInputLinear layers; run sparsify_activations_ first")
    for layer in layers.values():
        layer.token_fraction = float(fraction)
