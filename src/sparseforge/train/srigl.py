"""Structured RigL (SRigL): RigL under a constant fan-in constraint, with neuron ablation.

Lasby, Golubeva, Evci, Nica, Ioannou 2023, "Dynamic Sparse Training with Structured Sparsity"
(reference code calgaryml/condensed-sparsity, ``rigl_constant_fan.py``). Every *active* output
neuron keeps the same number ``k`` of inputs (the ``FanIn`` pattern, which the condensed kernels
run fast); neurons that RigL's own criteria no longer find useful are switched off entirely and
their weights handed to the other neurons of the layer.

At an update step ``t`` (same schedule and cosine drop fraction ``f(t)`` as RigL), per layer with
``A`` weights allotted (``A = k0 * out``, ``k0`` the fan-in at attach time):

1. **Saliency.** Run the *unstructured* RigL update of the layer (drop the ``K = floor(f * active)``
   smallest ``|w|``, grow the ``K`` largest dense ``|grad|`` among the rest); the weights active
   after it are the salient ones. Count them per neuron: ``c_j``.
2. **Ablation.** Neuron ``j`` is ablated when ``c_j < gamma_sal * k0``. At least
   ``ceil(A / in)`` neurons stay (the most salient ones), so the fan-in fits the layer.
   The last sparsified layer is not ablated unless ``ablate_last`` (its neurons are outputs).
3. **New fan-in** ``k = floor(A / n_active)``: the ablated neurons' weights go to the others.
4. **Drop.** Keep the ``active - K`` largest ``|w|`` of the layer among the active weights of
   non-ablated neurons, then at most ``k`` per neuron (largest ``|w|``).
5. **Grow.** Fill every non-ablated neuron up to ``k`` with the largest dense ``|grad|`` among its
   inputs not kept; grown weights start at zero. An ablated neuron whose gradients make it
   salient again comes back with ``k`` fresh inputs.

All selections go through :func:`sparseforge.masks.mask_from_scores` (``Unstructured`` for the
layer-wise steps, ``FanIn(k)`` per neuron). The active count is ``k * n_active <= A``: it drops by
less than ``n_active`` weights when ``A`` is not a multiple of the active neurons (as in the
reference code), and never grows.

Example:
    >>> import torch, torch.nn as nn
    >>> from sparseforge.train.srigl import SRigL
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> tr = SRigL(net, opt, sparsity=0.75, schedule={"end_step": 30, "update_interval": 10})
    >>> for _ in range(20):
    ...     net(torch.randn(8, 16)).square().mean().backward()
    ...     opt.step(); opt.zero_grad()
    ...     _ = tr.step()
    >>> rows = tr.layers[0].mask.sum(1)
    >>> bool((rows[rows > 0] == tr.fan_in["0"]).all())  # every active neuron has the same fan-in
    True
"""

from __future__ import annotations

import math

import torch

from sparseforge.masks import mask_from_scores
from sparseforge.patterns import FanIn, Unstructured
from sparseforge.train.config import SRigLConfig
from sparseforge.train.methods import RigL
from sparseforge.train.updates import drop_and_grow, exclude_scores

__all__ = ["SRigL", "srigl_update"]


def srigl_update(
    mask: torch.Tensor,
    weight_abs: torch.Tensor,
    grad_abs: torch.Tensor,
    budget: int,
    drop_fraction: float,
    gamma_sal: float,
    ablate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One SRigL update of one layer (steps 1-5 of the module doc).

    ``mask``, ``weight_abs``, ``grad_abs`` are ``(out, in)``; ``budget`` is the layer's allotted
    active count ``A``. Returns ``(new mask, active neurons (out,) bool, fan-in k)``.
    """
    rows, cols = mask.shape
    if budget == 0:  # nothing allotted (sparsity rounds every row to 0 inputs): nothing to move
        return torch.zeros_like(mask), torch.zeros(rows, dtype=torch.bool, device=mask.device), 0
    k0 = budget // rows
    if ablate and gamma_sal > 0:
        salient = drop_and_grow(mask, weight_abs, grad_abs, Unstructured(), drop_fraction).mask  # (out, in)
        counts = salient.sum(1)  # (out,)
        alive = counts.float() >= gamma_sal * k0  # (out,)
        need = math.ceil(budget / cols)
        if int(alive.sum()) < need:  # keep the `need` most salient neurons (ties: lower index)
            alive = mask_from_scores(counts.float().reshape(1, rows), Unstructured(), (rows - need) / rows).reshape(rows)
    else:
        alive = torch.ones(rows, dtype=torch.bool, device=mask.device)
    k = budget // int(alive.sum())
    rows_alive = alive.reshape(rows, 1)  # (out, 1)

    active = int(mask.sum())
    n_keep = active - math.floor(drop_fraction * active + 1e-9)
    candidates = mask & rows_alive  # (out, in)
    total = mask.numel()
    kept = mask_from_scores(exclude_scores(weight_abs, ~candidates), Unstructured(), (total - n_keep) / total) & candidates
    kept = mask_from_scores(exclude_scores(weight_abs, ~kept), FanIn(k)) & kept  # at most k per neuron
    grow = grad_abs.detach().float()
    lifted = grow.masked_fill(kept, float(grow.max()) + 1.0 if grow.numel() else 1.0)  # kept ones rank first
    new = mask_from_scores(lifted, FanIn(k)) & rows_alive
    return new, alive, k


class SRigL(RigL):
    """Structured RigL: constant fan-in drop-and-grow with neuron ablation (see the module doc)."""

    config_class = SRigLConfig

    def __init__(self, model, optimizer, config: SRigLConfig | None = None, **fields) -> None:
        super().__init__(model, optimizer, config, **fields)
        self.budget = {l.name: int(l.mask.sum()) for l in self.layers}  # A: weights allotted per layer
        self.fan_in = {l.name: int(l.mask.sum()) // l.mask.shape[0] for l in self.layers}
        self.ablated = {l.name: 0 for l in self.layers}  # neurons switched off at the last update

    def update_masks(self, t: int) -> tuple[float, dict[str, torch.Tensor]]:
        fraction = self.drop_fraction(t)
        last = self.layers[-1].name
        masks = {}
        for layer in self.layers:
            ablate = layer.name != last or self.config.ablate_last
            new, alive, k = srigl_update(layer.mask, layer.weight.abs(), self.grow_scores(layer),
                                         self.budget[layer.name], fraction, self.config.gamma_sal, ablate)
            masks[layer.name] = new
            self.fan_in[layer.name] = k
            self.ablated[layer.name] = int((~alive).sum())
        return fraction, masks

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        for layer in self.layers:  # fan-in and ablation count as the loaded masks have them
            per_row = layer.mask.sum(1)
            self.fan_in[layer.name] = int(per_row.max())
            self.ablated[layer.name] = int((per_row == 0).sum())
