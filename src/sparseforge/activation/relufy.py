"""ReLU-fication: give a GLU MLP an activation with exact zeros, recover it by fine-tuning, skip the zeros.

SiLU / GELU gates are almost never exactly zero, so TEAL-style thresholds lose a little at every
skipped channel. A ReLU-family gate makes most of them exactly zero, and then skipping is lossless:

* ``"relu2"``: ``relu(g)^2`` (ReLU² Wins, Zhang et al. 2024): the MLP computes
  ``down(relu(gate(x))^2 * up(x))``.
* ``"relu"``: ``relu(g)`` (ProSparse's first stage, Song et al. 2024).

:func:`relufy_` swaps the ``act_fn`` of every GLU MLP (``gate_proj``, ``up_proj``, ``down_proj``,
``act_fn``: Llama, Qwen2, Mistral) for the ReLU-family module and sets the transformers config's
``hidden_act`` to its name, so ``save_pretrained`` / ``sparseforge.load`` rebuild the same model
with no model code copied. The model then needs recovery fine-tuning (:func:`sparseforge.finetune.finetune_`
with a distillation loss from the original model, ``FinetuneConfig(allow_dense=True)``);
:class:`ActivationL1` adds ProSparse's progressive L1 penalty on the gate activations during it
(its gradient, through a tensor hook: no change to the loss code). :func:`relu_sparse_` finally
swaps each MLP for a :class:`~sparseforge.activation.cats.CATSMLP` with threshold 0: up_proj computes
only the rows whose gate is nonzero at batch 1 and down_proj skips the zero channels, with outputs
equal to the dense MLP's up to float rounding. dReLU (Turbo Sparse: ``relu(gate) * relu(up)``) is not
included: it needs a second activation on ``up_proj`` that transformers' Llama MLP has no slot for.

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

__all__ = ["SquaredReLU", "ACTIVATIONS", "relufy_", "relu_sparse_", "ActivationL1", "glu_mlps", "gate_sparsity"]


class SquaredReLU(nn.Module):
    """``relu(x)^2`` (transformers' ``hidden_act="relu2"``)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.square(torch.relu(x))


ACTIVATIONS = {"relu2": SquaredReLU, "relu": nn.ReLU}  # name (transformers ACT2FN key) -> module


def glu_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """The model's GLU MLPs (and CATS MLPs) by name."""
    found = {n: m for n, m in model.named_modules() if is_swiglu_mlp(m) or isinstance(m, CATSMLP)}
    if not found:
        raise ModelError(f"{type(model).__name__} has no GLU MLP (gate_proj, up_proj, down_proj, act_fn) to ReLU-fy")
    return found


def relufy_(model: nn.Module, activation: str = "relu2") -> list[str]:
    """Replace the gate activation of every GLU MLP by ``activation`` (``"relu2"`` or ``"relu"``), in
    place; records it as ``model.config.hidden_act`` when the model has a config. Returns the MLP names.

    The model's function changes: fine-tune it afterwards (module doc)."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"ReLU-fication activation {activation!r} is not known; use one of {', '.join(ACTIVATIONS)}")
    mlps = glu_mlps(model)
    for mlp in mlps.values():
        mlp.act_fn = ACTIVATIONS[activation]()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "hidden_act"):
        config.hidden_act = activation
    return list(mlps)


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
    """Fraction of exact zeros in the gate activations of the model's GLU MLPs on ``input_ids``."""
    zeros, total = 0, 0

    def count(module, args, out):
        nonlocal zeros, total
        zeros += int((out == 0).sum())
        total += out.numel()

    handles = [m.act_fn.register_forward_hook(count) for m in glu_mlps(model).values() if isinstance(m.act_fn, nn.Module)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return zeros / total if total else float("nan")


class ActivationL1:
    """ProSparse-style progressive L1 regularisation of the gate activations during fine-tuning.

    Adds ``lam * mean(|a|)`` per MLP to the training objective by adding its gradient
    ``lam * sign(a) / a.numel()`` to ``a``'s gradient (a tensor hook on each ``act_fn`` output while
    training), so any training loop (e.g. :func:`sparseforge.finetune.finetune_`) applies it. ``lam``
    rises from 0 to ``peak`` along a quarter sine over ``warmup`` steps, then stays (ProSparse raises the
    factor in sine-shaped stages to keep training stable); call :meth:`step` once per optimizer step
    (``finetune_(callback=l1.callback)``) and :meth:`remove` at the end.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> mlp = nn.Module(); mlp.act_fn = nn.ReLU()
        >>> mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(4, 2)
        >>> l1 = ActivationL1(nn.ModuleDict({"mlp": mlp}), peak=1e-3, warmup=10)
        >>> l1.step(); round(l1.lam, 6)
        0.000156
        >>> l1.remove()
    """

    def __init__(self, model: nn.Module, peak: float, warmup: int, *, mlps: Optional[list[str]] = None) -> None:
        if not (isinstance(peak, (int, float)) and peak >= 0 and math.isfinite(peak)):
            raise ConfigError(f"L1 peak must be a finite number >= 0, got {peak!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ConfigError(f"L1 warmup must be a positive number of steps, got {warmup!r}")
        found = glu_mlps(model)
        names = list(found) if mlps is None else mlps
        self.peak, self.warmup, self.steps, self.lam = float(peak), warmup, 0, 0.0
        self.handles = [found[n].act_fn.register_forward_hook(self._hook) for n in names]

    def _hook(self, module, args, out: Tensor) -> None:
        if out.requires_grad and self.lam > 0:
            lam, sign = self.lam, torch.sign(out.detach())
            out.register_hook(lambda g: g + (lam / out.numel()) * sign)

    def step(self) -> None:
        self.steps += 1
        self.lam = self.peak * math.sin(0.5 * math.pi * min(1.0, self.steps / self.warmup))

    def callback(self, info) -> None:
        """For ``finetune_(callback=...)``: one :meth:`step` per optimizer step."""
        self.step()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
