"""S-STE: N:M training with a continuous pruning function and a fixed per-tensor scale.

Hu, Zhu & Chen, "S-STE: Continuous Pruning Function for Efficient 2:4 Sparse Pre-training"
(NeurIPS 2024; reference code huyz2023/2by4-pretrain). STE and SR-STE prune with a *hard*
threshold, a discontinuous function of ``W``; S-STE replaces it by **soft thresholding**. In every
group of M consecutive inputs, with ``t`` the (N+1)-th largest ``|w|`` of the group::

    S(w)_i = sign(w_i) * max(|w_i| - t, 0)

so the N largest weights are kept, each shifted toward zero by ``t``, and the others are 0 (2:4:
``t`` is the 3rd largest = 2nd smallest magnitude, the paper's function). ``S`` is continuous in
``W``. The forward uses ``beta * S(W)``, with a **per-tensor scale fixed at the start**::

    beta = <W, S(W)> / <S(W), S(W)>        (argmin_beta ||W - beta S(W)||^2, on the initial W)

and the backward passes ``dL/d(beta S(W))`` straight through to the dense ``W`` (as the reference
code's ``SoftThreshold``; no SR-STE decay term). The paper defines ``S`` for 2:4; this module
applies the same rule to any N:M (subtract the (N+1)-th largest magnitude of the group), which for
1:4 shifts the largest weight by the second largest. Not implemented: the paper's MVUE estimator
for the weight gradient and FP8 (GPU speed techniques, not part of the pruning function).

The masks (which N are kept, for the flip rate) come from :func:`sparseforge.masks.mask_from_scores`
and are refreshed in ``trainer.step()`` like STE's; ``t`` is the largest pruned ``|w|`` of the group.
``finalize()`` bakes ``beta * S(W)`` (a valid N:M weight) into a plain weight.

Example:
    >>> import torch, torch.nn as nn
    >>> from sparseforge.train import SSTE
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> trainer = SSTE(net, opt, pattern="2:4")
    >>> net(torch.randn(4, 8)).square().mean().backward(); opt.step(); _ = trainer.step()
    >>> trainer.finalize(); float((net[0].weight == 0).float().mean()) >= 0.5
    True
"""

from __future__ import annotations

import torch
from torch import nn

from sparseforge.errors import NumericalError
from sparseforge.train.base import SparseLayer
from sparseforge.train.config import SSTEConfig
from sparseforge.train.nm import STE

__all__ = ["SSTE", "SoftNM", "soft_threshold", "sste_scale"]


def soft_threshold(weight: torch.Tensor, mask: torch.Tensor, m: int) -> torch.Tensor:
    """``S(W)`` of an ``(out, in)`` weight whose keep-``mask`` has N per group of ``m`` inputs.

    ``t`` of a group is the largest ``|w|`` among its pruned entries (the (N+1)-th largest when the
    mask holds the top N); kept entries become ``sign(w) * max(|w| - t, 0)``, pruned ones 0.
    """
    rows, cols = weight.shape
    w = weight.reshape(rows, cols // m, m)  # (out, groups, m)
    keep = mask.reshape(rows, cols // m, m)
    t = torch.where(keep, 0.0, w.abs()).amax(dim=2, keepdim=True)  # (out, groups, 1)
    shifted = torch.sign(w) * torch.clamp(w.abs() - t, min=0.0) * keep
    return shifted.reshape(rows, cols)


def sste_scale(weight: torch.Tensor, mask: torch.Tensor, m: int) -> float:
    """The paper's per-tensor scale ``<W, S(W)> / <S(W), S(W)>`` of an ``(out, in)`` weight."""
    s = soft_threshold(weight.double(), mask, m)
    denom = float((s * s).sum())
    if denom == 0.0:
        raise NumericalError("S-STE: the soft-thresholded weight is all zero (every group has equal |w|), "
                             "so its scale is undefined; initialise the layer randomly before attaching S-STE")
    return float((weight.double() * s).sum()) / denom


class _SoftSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mask, scale, m, transposed):  # weight, mask in the weight's layout
        w = weight.t() if transposed else weight  # (out, in)
        k = mask.t() if transposed else mask
        out = scale * soft_threshold(w, k, m)
        return out.t() if transposed else out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None  # straight through to the dense weight


class SoftNM(nn.Module):
    """Parametrization ``beta * S(W)`` with a straight-through backward; buffers ``mask`` and ``scale``."""

    def __init__(self, mask: torch.Tensor, scale: float, m: int, transposed: bool) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.m, self.transposed = m, transposed
        self.flow = 0.0  # S-STE has no gradient-flow decay (config refuses it)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _SoftSTE.apply(weight, self.mask, self.scale.to(weight.dtype), self.m, self.transposed)


class SSTE(STE):
    """S-STE: ``beta * S(W)`` forward (soft-thresholded N:M, fixed per-tensor ``beta``); see the module doc."""

    config_class = SSTEConfig

    def _parametrization(self, layer: SparseLayer, mask: torch.Tensor) -> nn.Module:
        out_in = mask.t() if layer.transposed else mask  # (out, in)
        scale = sste_scale(layer.weight.detach(), out_in, self.pattern.m)  # fixed from the initial W
        return SoftNM(mask, scale, self.pattern.m, layer.transposed)

    def scales(self) -> dict[str, float]:
        """The fixed per-tensor scale ``beta`` of every layer."""
        return {l.name: float(l.module.parametrizations.weight[0].scale) for l in self.layers}
