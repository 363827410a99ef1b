"""ReLU-fication: give a GLU MLP an activation with exact zeros, recover it by fine-tuning, skip the zeros.

SiLU / GELU gates are almost never exactly zero, so TEAL-style thresholds lose a little at every
skipped channel. A ReLU-family gate makes most of them exactly zero, and then skipping is lossless:

* ``"relu2"``: ``relu(g)^2`` (ReLU² Wins, Zhang et al. 2024): the MLP computes
  ``down(relu(gate(x))^2 * up(x))``.
* ``"relu"``: ``relu(g)`` (ProSparse's first stage, Song et al. 2024).
* ``"drelu"``: ``relu(g) * relu(u)`` (dReLU, Turbo Sparse, Song et al. 2024, arXiv:2406.05955): the
  MLP computes ``down(relu(gate(x)) * relu(up(x)))``, so a channel is zero where either is.

:func:`relufy_` swaps the ``act_fn`` of every GLU MLP (``gate_proj``, ``up_proj``, ``down_proj``,
``act_fn``: Llama, Qwen2, Mistral) for the ReLU-family module and sets the transformers config's
``hidden_act`` to its name, so ``save_pretrained`` / ``sparseforge.load`` rebuild the same model
with no model code copied. transformers' GLU MLPs have no activation slot on ``up_proj``, so
``"drelu"`` replaces each MLP module by a :class:`DReLUMLP` that reuses its three projection
modules (same parameter names, same state dict), sets ``hidden_act = "relu"`` and records
``config.mlp_up_act = "relu"`` (:data:`UP_ACT_KEY`); :func:`restore_mlp_variant_` (called by
``sparseforge.load``) swaps the MLPs back in from that record. A plain
``transformers.from_pretrained`` of such a checkpoint ignores the record and builds ReLU-gated
MLPs without the ``up_proj`` ReLU: load it with ``sparseforge.load``. The model then needs recovery fine-tuning (:func:`sparseforge.finetune.finetune_`
with a distillation loss from the original model, ``FinetuneConfig(allow_dense=True)``);
:class:`ActivationL1` adds ProSparse's progressive L1 penalty on the gate activations during it
(its gradient, through a tensor hook: no change to the loss code; ``FinetuneConfig(l1_schedule=...)``
attaches it, with the stages of :class:`~sparseforge.activation.l1_schedule.L1Schedule`).
ProSparse's last step, activation threshold shifting (Song et al. 2024, arXiv:2402.13516),
:func:`shift_activation_threshold_`, replaces each ReLU gate by :class:`FATReLU` (Kurtz et al. 2020:
``x`` where ``x >= threshold``, else 0), recorded as ``config.fatrelu_threshold``
(:data:`FATRELU_KEY`) and restored by ``sparseforge.load``. :func:`relu_sparse_` finally
swaps each MLP for a :class:`~sparseforge.activation.cats.CATSMLP` with threshold 0: up_proj computes
only the rows whose gate is nonzero at batch 1 and down_proj skips the zero channels, with outputs
equal to the dense MLP's up to float rounding (a dReLU MLP keeps its ``up_proj`` ReLU there, and
down_proj skips the zeros of both).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparseforge.activation.relufy import SquaredReLU
    >>> SquaredReLU()(torch.tensor([-1.0, 0.0, 3.0]))
    tensor([0., 0., 9.])
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from sparseforge.activation.cats import CATSMLP, is_swiglu_mlp
from sparseforge.errors import ConfigError, ModelError
from sparseforge.layers import set_module

__all__ = ["SquaredReLU", "DReLUMLP", "FATReLU", "ACTIVATIONS", "UP_ACT_KEY", "FATRELU_KEY", "relufy_", "relu_sparse_",
           "restore_mlp_variant_", "shift_activation_threshold_", "ActivationL1", "glu_mlps", "gate_sparsity",
           "has_glu_projections"]


class SquaredReLU(nn.Module):
    """``relu(x)^2`` (transformers' ``hidden_act="relu2"``)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.square(torch.relu(x))


class FATReLU(nn.Module):
    """Forced-activation-threshold ReLU (Kurtz et al. 2020; ProSparse's threshold shifting):
    ``x`` where ``x >= threshold``, else 0; ``threshold=0`` is ReLU.

    Example:
        >>> import torch
        >>> FATReLU(0.1)(torch.tensor([-1.0, 0.05, 0.1, 2.0]))
        tensor([0.0000, 0.0000, 0.1000, 2.0000])
    """

    def __init__(self, threshold: float) -> None:
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
                math.isfinite(threshold) and threshold >= 0):
            raise ConfigError(f"FATReLU threshold must be a finite number >= 0, got {threshold!r}")
        self.threshold = float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x >= self.threshold, torch.relu(x), torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"


ACTIVATIONS = {"relu2": SquaredReLU, "relu": nn.ReLU, "drelu": nn.ReLU}  # name -> gate activation module
UP_ACT_KEY = "mlp_up_act"  # transformers config attribute recording the up_proj activation of dReLU MLPs
FATRELU_KEY = "fatrelu_threshold"  # transformers config attribute recording the FATReLU gate threshold


def has_glu_projections(module: nn.Module) -> bool:
    """Has ``gate_proj``, ``up_proj``, ``down_proj`` (any modules: ``nn.Linear``, ``SparseLinear``, ...)
    and a callable ``act_fn``."""
    return all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")) and (
        callable(getattr(module, "act_fn", None)))


class DReLUMLP(nn.Module):
    """dReLU GLU MLP (Turbo Sparse): ``down(relu(gate(x)) * relu(up(x)))`` over the projection
    modules of an existing GLU MLP (no copy: the same ``gate_proj`` / ``up_proj`` / ``down_proj``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> mlp = nn.Module()
        >>> mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
        >>> mlp.act_fn = nn.SiLU()
        >>> d = DReLUMLP(mlp)
        >>> x = torch.randn(2, 4)
        >>> ref = mlp.down_proj(torch.relu(mlp.gate_proj(x)) * torch.relu(mlp.up_proj(x)))
        >>> torch.allclose(d(x), ref), d.up_proj is mlp.up_proj
        (True, True)
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        if not has_glu_projections(mlp):
            raise ModelError(f"dReLU needs a GLU MLP with gate_proj, up_proj, down_proj and act_fn; got {type(mlp).__name__}")
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = nn.ReLU()  # on the gate (relu_sparse_ / CATS read act_fn)
        self.up_act = nn.ReLU()  # on up_proj's output

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_act(self.up_proj(x)))


def glu_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """The model's GLU MLPs (and CATS MLPs) by name."""
    found = {n: m for n, m in model.named_modules() if is_swiglu_mlp(m) or isinstance(m, CATSMLP)}
    if not found:
        raise ModelError(f"{type(model).__name__} has no GLU MLP (gate_proj, up_proj, down_proj, act_fn) to ReLU-fy")
    return found


def relufy_(model: nn.Module, activation: str = "relu2") -> list[str]:
    """Replace the gate activation of every GLU MLP by ``activation`` (``"relu2"``, ``"relu"``, or
    ``"drelu"``: each MLP becomes a :class:`DReLUMLP`, ReLU on gate and up), in place; records it in
    ``model.config`` when the model has one (``hidden_act``; for dReLU also :data:`UP_ACT_KEY`).
    Returns the MLP names.

    The model's function changes: fine-tune it afterwards (module doc).

    Example:
        >>> from torch import nn
        >>> mlp = nn.Module()
        >>> mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
        >>> mlp.act_fn = nn.SiLU()
        >>> model = nn.ModuleDict({"mlp": mlp})
        >>> relufy_(model, "drelu"), type(model["mlp"]).__name__
        (['mlp'], 'DReLUMLP')
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"ReLU-fication activation {activation!r} is not known; use one of {', '.join(ACTIVATIONS)}")
    mlps = glu_mlps(model)
    drelu = activation == "drelu"
    for name, mlp in mlps.items():
        if isinstance(mlp, DReLUMLP) and not drelu:
            raise ModelError(f"{name} is a dReLU MLP; relufy_ a fresh model for {activation!r}")
    for name, mlp in mlps.items():
        if isinstance(mlp, (DReLUMLP, CATSMLP)):  # already wrapped: set both activations in place
            mlp.act_fn = ACTIVATIONS[activation]()
            mlp.up_act = nn.ReLU() if drelu else None
        elif drelu:
            set_module(model, name, DReLUMLP(mlp))
        else:
            mlp.act_fn = ACTIVATIONS[activation]()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "hidden_act"):
        config.hidden_act = "relu" if drelu else activation
        if drelu:
            setattr(config, UP_ACT_KEY, "relu")
        elif hasattr(config, UP_ACT_KEY):
            delattr(config, UP_ACT_KEY)
    return list(mlps)


def restore_mlp_variant_(model: nn.Module) -> list[str]:
    """Rebuild the dReLU MLPs a checkpoint's config records (:data:`UP_ACT_KEY`), in place; returns
    the MLP names (empty when the config records none). The FATReLU gates the config records
    (:data:`FATRELU_KEY`) are put back too. ``sparseforge.load`` calls it."""
    config = getattr(model, "config", None)
    names = _restore_drelu_(model, config)
    if getattr(config, FATRELU_KEY, None) is not None:  # after dReLU: its MLPs get their own ReLU gate
        _restore_fatrelu_(model, getattr(config, FATRELU_KEY))
    return names


def _restore_drelu_(model: nn.Module, config) -> list[str]:
    up_act = getattr(config, UP_ACT_KEY, None)
    if up_act is None:
        return []
    if up_act != "relu":
        raise ConfigError(f"config.{UP_ACT_KEY} = {up_act!r} is not known; sparseforge records 'relu' (dReLU)")
    # projections of any kind: a sparse load holds SparseLinear layers
    names = [n for n, m in model.named_modules()
             if has_glu_projections(m) and not isinstance(m, (DReLUMLP, CATSMLP))]
    if not names and not any(isinstance(m, DReLUMLP) for m in model.modules()):
        raise ModelError(f"config.{UP_ACT_KEY} records dReLU MLPs but {type(model).__name__} has no GLU MLP")
    for name in names:
        set_module(model, name, DReLUMLP(model.get_submodule(name)))
    config.hidden_act = "relu"
    return names


def _is_relu_gate(act) -> bool:
    return isinstance(act, (nn.ReLU, FATReLU)) or type(act).__name__ == "ReLU"  # transformers' ACT2FN["relu"]


def shift_activation_threshold_(model: nn.Module, threshold: float) -> list[str]:
    """ProSparse's activation threshold shifting: the ReLU gate of every GLU MLP becomes
    :class:`FATReLU` with ``threshold`` (positive gate outputs below it become exact zeros, which
    :func:`relu_sparse_` then skips), in place; recorded in ``model.config`` (:data:`FATRELU_KEY`)
    when the model has one, so ``sparseforge.load`` restores it. Returns the MLP names.

    ProSparse uses a small threshold (the paper's models: about 0.01) after the L1 stages; measure
    the perplexity after the shift. Refuses a gate that is not ReLU (SiLU, ReLU²): a threshold
    there is TEAL / CATS (:func:`~sparseforge.activation.sparsify_activations_`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> mlp = nn.Module(); mlp.act_fn = nn.ReLU()
        >>> mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(4, 2)
        >>> shift_activation_threshold_(nn.ModuleDict({"mlp": mlp}), 0.01), mlp.act_fn
        (['mlp'], FATReLU(threshold=0.01))
    """
    gate = FATReLU(threshold)  # checks the threshold
    mlps = glu_mlps(model)
    for name, mlp in mlps.items():
        if not _is_relu_gate(mlp.act_fn):
            raise ModelError(f"{name} has gate activation {type(mlp.act_fn).__name__}; threshold shifting needs a ReLU "
                             "gate: relufy_(model, 'relu') (and fine-tune) first")
    for mlp in mlps.values():
        mlp.act_fn = FATReLU(gate.threshold)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "hidden_act"):
        setattr(config, FATRELU_KEY, gate.threshold)
    return list(mlps)


def _restore_fatrelu_(model: nn.Module, threshold) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ConfigError(f"config.{FATRELU_KEY} = {threshold!r} is not a number; sparseforge records the FATReLU "
                          "gate threshold there")
    mlps = {n: m for n, m in model.named_modules() if has_glu_projections(m)}  # a sparse load: SparseLinear projections
    if not mlps:
        raise ModelError(f"config.{FATRELU_KEY} records FATReLU gates but {type(model).__name__} has no GLU MLP")
    for name, mlp in mlps.items():
        if not _is_relu_gate(mlp.act_fn):
            raise ModelError(f"config.{FATRELU_KEY} records FATReLU gates but {name} has "
                             f"{type(mlp.act_fn).__name__} (config.hidden_act must be 'relu')")
    gate = FATReLU(float(threshold))  # checks the value
    for mlp in mlps.values():
        mlp.act_fn = FATReLU(gate.threshold)


def relu_sparse_(model: nn.Module) -> list[str]:
    """Swap every ReLU-family GLU MLP for a :class:`CATSMLP` with threshold 0 (lossless: only exact
    zeros of the gate are skipped). Refuses an MLP whose activation is not ReLU-family (zero for every
    input <= 0; transformers' ``relu2`` of a reloaded model qualifies), where threshold 0 would skip
    nothing. Returns the MLP names."""
    mlps = glu_mlps(model)
    probe = torch.tensor([-3.0, -1e-3, 0.0])
    for name, mlp in mlps.items():
        with torch.no_grad():
            zero_below = bool((mlp.act_fn(probe) == 0).all()) and bool(mlp.act_fn(torch.ones(1)) != 0)
        if not zero_below:  # e.g. SiLU: threshold 0 would skip nothing
            raise ModelError(f"{name} has activation {type(mlp.act_fn).__name__}, not ReLU-family: run relufy_ (and "
                             "fine-tune) first, or use sparsify_activations_ for thresholds on a SiLU/GELU gate")
    for name, mlp in mlps.items():
        if isinstance(mlp, CATSMLP):
            mlp.set_threshold(0.0)
        else:
            cats = CATSMLP(mlp, 0.0)
            cats.activation_info = {"method": "relu", "sparsity": 0.0}
            set_module(model, name, cats)
    return list(mlps)


def gate_sparsity(model: nn.Module, input_ids: Tensor) -> float:
    """Fraction of exact zeros in the gate activations of the model's GLU MLPs on ``input_ids`` (for a
    dReLU MLP: in ``relu(gate) * relu(up)``, the input of ``down_proj``)."""
    zeros, total = 0, 0

    def count(module, args, out):
        nonlocal zeros, total
        zeros += int((out == 0).sum())
        total += out.numel()

    handles = []
    for m in glu_mlps(model).values():
        if getattr(m, "up_act", None) is not None:
            handles.append(m.down_proj.register_forward_pre_hook(lambda mod, args: count(mod, args, args[0])))
        elif isinstance(m.act_fn, nn.Module):
            handles.append(m.act_fn.register_forward_hook(count))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return zeros / total if total else float("nan")


class ActivationL1:
    """ProSparse's progressive L1 regularisation of the gate activations during fine-tuning.

    Adds ``lam * mean(|a|)`` per MLP (dReLU: per factor, gate and up) to the training objective by
    adding its gradient ``lam * sign(a) / a.numel()`` to ``a``'s gradient (a tensor hook on each
    ``act_fn`` output while training), so any training loop (e.g. :func:`sparseforge.finetune.finetune_`)
    applies it. ``lam`` follows ``schedule``
    (:class:`~sparseforge.activation.l1_schedule.L1Schedule`: ProSparse's warm-up constant, then
    sine-shaped rises in stages), or, given ``peak`` and ``warmup`` instead, one quarter sine from 0
    to ``peak`` over ``warmup`` steps. Call :meth:`step` once per optimizer step
    (``finetune_(callback=l1.callback)``) or :meth:`set_step` before each (``FinetuneConfig(l1_schedule=...)``
    does that), and :meth:`remove` at the end. :attr:`penalty` holds the last forward's
    ``sum(lam * mean(|a|))`` (the term's value; it is not part of the loss the loop reports).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> mlp = nn.Module(); mlp.act_fn = nn.ReLU()
        >>> mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(4, 2)
        >>> l1 = ActivationL1(nn.ModuleDict({"mlp": mlp}), peak=1e-3, warmup=10)
        >>> round(l1.lam, 6)                      # the factor of the first step
        0.000156
        >>> l1.step(); round(l1.lam, 6)           # one step done: the second step's
        0.000309
        >>> l1.remove()
    """

    def __init__(self, model: nn.Module, peak: Optional[float] = None, warmup: Optional[int] = None, *,
                 schedule=None, mlps: Optional[list[str]] = None) -> None:
        from sparseforge.activation.l1_schedule import L1Schedule

        if schedule is None:
            if not (isinstance(peak, (int, float)) and not isinstance(peak, bool) and peak >= 0 and math.isfinite(peak)):
                raise ConfigError(f"L1 peak must be a finite number >= 0, got {peak!r}")
            if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
                raise ConfigError(f"L1 warmup must be a positive number of steps, got {warmup!r}")
            schedule = L1Schedule.single(float(peak), warmup)
        elif peak is not None or warmup is not None:
            raise ConfigError("give the L1 factor either as schedule= or as peak= and warmup=, not both")
        self.schedule = L1Schedule(schedule)
        found = glu_mlps(model)
        names = list(found) if mlps is None else mlps
        self.steps, self.lam, self.penalty = 0, self.schedule.value(1), 0.0  # steps done; the next step's factor
        self.handles = [found[n].act_fn.register_forward_hook(self._hook) for n in names]
        # dReLU: the up activation is penalised too (both factors' zeros make the product's)
        self.handles += [found[n].up_act.register_forward_hook(self._hook) for n in names
                         if getattr(found[n], "up_act", None) is not None]
        self._forward_pre = model.register_forward_pre_hook(self._reset_penalty)

    @property
    def peak(self) -> float:
        """The final factor of the schedule."""
        return self.schedule.stages[-1][0]

    def _reset_penalty(self, module, args) -> None:
        self.penalty = 0.0

    def _hook(self, module, args, out: Tensor) -> None:
        if out.requires_grad and self.lam > 0:
            lam, sign = self.lam, torch.sign(out.detach())
            self.penalty += lam * float(out.detach().abs().mean())
            out.register_hook(lambda g: g + (lam / out.numel()) * sign)

    def set_step(self, step: int) -> None:
        """Use the factor of optimizer step ``step`` (1-based: the step about to run)."""
        self.steps, self.lam = step - 1, self.schedule.value(step)

    def step(self) -> None:
        """One optimizer step done: use the factor of the next one."""
        self.set_step(self.steps + 2)

    def callback(self, info) -> None:
        """For ``finetune_(callback=...)``: one :meth:`step` per optimizer step."""
        self.step()

    def remove(self) -> None:
        for h in self.handles + [self._forward_pre]:
            h.remove()
        self.handles = []
