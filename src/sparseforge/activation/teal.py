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
    >>> from sparseforge.activation.calibrate import Histogram
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

from sparseforge.activation.calibrate import Histogram, calibration_batches, check_finite
from sparseforge.activation.cats import CATSMLP, is_swiglu_mlp
from sparseforge.activation.config import ActivationSparsityConfig
from sparseforge.activation.linear import SparseInputLinear
from sparseforge.activation.rsparse import RSparseLinear, calibrate_rsparse
from sparseforge.errors import ConfigError, ModelError
from sparseforge.layers import find_blocks, select_targets, set_module
from sparseforge.ops.sparse_input import sparse_input_masked
from sparseforge.prune.sequential import BlockInputs, capture_block_inputs, float32_block

__all__ = [
    "GreedyStep", "LayerThreshold", "ActivationSparsityReport", "sparsify_activations_",
    "greedy_allocation", "set_token_fraction", "sparse_input_layers",
]

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

    def info(self, method: str) -> dict:
        """What the layer records for checkpoints (``activation_info``)."""
        return {"method": method, "sparsity": self.sparsity, "calibrated_sparsity": self.calibration_sparsity}


@dataclass
class ActivationSparsityReport:
    config: ActivationSparsityConfig
    layers: list[LayerThreshold]
    greedy: dict[int, list[GreedyStep]] = field(default_factory=dict)  # block -> path
    seconds: float = 0.0
    histograms: dict[str, Histogram] = field(default_factory=dict, repr=False)  # layer -> its input's
    block_of: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False)  # layer -> (block, local name)

    def effective_sparsity(self, model: nn.Module) -> float:
        """Skipped fraction of the sparsified layers' weight bytes at the calibrated sparsities
        (CATS: gate_proj stays dense, up_proj and down_proj skip ``s`` of theirs)."""
        modules = dict(model.named_modules())
        skipped = total = 0.0
        for t in self.layers:
            m = modules[t.name]
            if isinstance(m, CATSMLP):
                parts = [p.weight.numel() for p in (m.gate_proj, m.up_proj, m.down_proj)]
                skipped += t.sparsity * (parts[1] + parts[2])
                total += sum(parts)
            else:
                skipped += t.sparsity * m.in_features * m.out_features
                total += m.in_features * m.out_features
        return skipped / max(1.0, total)

    def retarget_(self, model: nn.Module, sparsity: float) -> None:
        """Set the thresholds of ``model``'s sparse-input layers for another ``sparsity`` from the
        same calibration (no new data pass): uniform = the histograms at ``sparsity``; greedy =
        each block's step closest to ``sparsity`` on the recorded path (TEAL's lookup), which must
        reach it (calibrate with the highest sparsity you want to try)."""
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"activation sparsity must be in [0, 1), got {sparsity!r}")
        if self.config.method == "rsparse":
            raise ConfigError("R-Sparse thresholds and ranks come from one calibration: call sparsify_activations_ "
                              "with the new sparsity")
        modules = dict(model.named_modules())
        signed = self.config.distribution == "signed" and self.config.method == "teal"
        for i, t in enumerate(self.layers):
            if not isinstance(modules.get(t.name), (SparseInputLinear, CATSMLP)):
                raise ModelError(f"layer {t.name} of this report is not a sparse-input layer (or CATS MLP) in the model")
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
            modules[t.name].set_threshold(threshold)
            self.layers[i] = LayerThreshold(t.name, s, threshold, float("nan"))
            modules[t.name].activation_info = self.layers[i].info(self.config.method)

    def summary(self) -> str:
        c = self.config
        if c.method == "cats":
            return f"CATS gate-output sparsity {c.sparsity:.0%} on {len(self.layers)} MLPs in {self.seconds:.1f}s"
        if c.method == "rsparse":
            return (f"R-Sparse activation sparsity {c.sparsity:.0%} (rho {c.rsparse_ratio}) on {len(self.layers)} "
                    f"projections in {self.seconds:.1f}s")
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
    if config.method == "cats":
        return _sparsify_cats(model, config, calibration, tokenizer, progress)
    start = time.perf_counter()
    prefix, blocks, per_block = _projections(model, config)
    batches = calibration_batches(config.calibration, calibration, tokenizer, "TEAL")
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
                    check_finite(f"{prefix}.{b}.{n}", seen[n])
                    values = torch.cat([x.reshape(-1) for x in seen[n]])
                    by_tensor[key] = Histogram.of(values if signed else values.abs())
                hists[n] = by_tensor[key]
            if config.allocation == "greedy" and names:
                path = greedy_allocation(block, names, inputs, greedy_batches, outputs[:greedy_batches], hists, config)
                paths[b] = path
                chosen = _closest(path, names, config.sparsity)
            else:
                chosen = {n: config.sparsity for n in names}
            block_modules = dict(block.named_modules())
            for n in names:
                full = f"{prefix}.{b}.{n}"
                if config.method == "rsparse":  # a threshold on |x| * ||W[:, i]|| and a low-rank term
                    t, per_channel, rank, skipped, _ = calibrate_rsparse(block_modules[n].weight, seen[n], chosen[n],
                                                                         config.rsparse_ratio)
                    replacements.append((full, (per_channel, rank)))
                else:
                    t = hists[n].threshold(chosen[n], signed)
                    skipped = float(sum((x.abs() <= t).sum() for x in seen[n]) / sum(x.numel() for x in seen[n]))
                    replacements.append((full, t))
                layers.append(LayerThreshold(full, chosen[n], t, skipped))
                kept_hists[full] = hists[n]
                block_of[full] = (b, n)
            del seen, hists, by_tensor
        inputs.hidden = outputs  # the dense block's outputs feed the next block (TEAL's grab_acts)
    modules = dict(model.named_modules())
    for (full, t), layer in zip(replacements, layers):
        if config.method == "rsparse":
            sparse = RSparseLinear.from_linear(modules[full], threshold=t[0], rank=t[1])
        else:
            sparse = SparseInputLinear.from_linear(modules[full], threshold=t)
        sparse.activation_info = layer.info(config.method)
        set_module(model, full, sparse)
    model.train(was_training)
    return ActivationSparsityReport(config, layers, paths, time.perf_counter() - start, kept_hists, block_of)


def _sparsify_cats(model: nn.Module, config: ActivationSparsityConfig, calibration, tokenizer,
                   progress: bool) -> ActivationSparsityReport:
    """CATS (sparseforge.activation.cats): per block, the |act(gate)| histogram of the dense model's
    calibration activations gives the MLP's threshold; the MLP module is swapped for a CATSMLP."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    try:
        prefix, blocks = find_blocks(model)
    except ModelError as exc:
        raise ModelError(f"CATS needs repeated transformer blocks with GLU MLPs: {exc}") from exc
    mlps = [[n for n, m in block.named_modules() if is_swiglu_mlp(m)] for block in blocks]
    if not any(mlps):
        raise ModelError(f"no supported MLPs (gate_proj, up_proj, down_proj, act_fn) to sparsify in {type(model).__name__}")
    batches = calibration_batches(config.calibration, calibration, tokenizer, "CATS")
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, blocks, batches)
    layers: list[LayerThreshold] = []
    hists: dict[str, Histogram] = {}
    block_of: dict[str, tuple[int, str]] = {}
    for b in tqdm(range(len(blocks)), desc=f"CATS {config.sparsity:.0%}", unit="block", disable=not progress):
        block = blocks[b]
        with float32_block(block):
            modules = dict(block.named_modules())
            gates: dict[str, list[Tensor]] = {n: [] for n in mlps[b]}
            handles = [modules[n].gate_proj.register_forward_hook(
                lambda m, a, out, n=n: gates[n].append(modules[n].act_fn(out).abs())) for n in mlps[b]]
            try:
                with torch.no_grad():
                    outputs = [inputs.call(block, i, h).float() for i, h in enumerate(inputs.hidden)]
            finally:
                for h in handles:
                    h.remove()
            for n in mlps[b]:
                full = f"{prefix}.{b}.{n}"
                check_finite(f"{full}.gate_proj", gates[n])
                hists[full] = Histogram.of(torch.cat([g.reshape(-1) for g in gates[n]]))
                t = hists[full].threshold(config.sparsity, signed=False)
                skipped = float(sum((g <= t).sum() for g in gates[n]) / sum(g.numel() for g in gates[n]))
                layers.append(LayerThreshold(full, config.sparsity, t, skipped))
                block_of[full] = (b, n)
        inputs.hidden = outputs
    modules = dict(model.named_modules())
    for t in layers:
        cats = CATSMLP(modules[t.name], t.threshold)
        cats.activation_info = t.info("cats")
        set_module(model, t.name, cats)
    model.train(was_training)
    return ActivationSparsityReport(config, layers, {}, time.perf_counter() - start, hists, block_of)


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
