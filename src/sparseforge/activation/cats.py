"""CATS: a threshold on the gate output of SwiGLU MLPs (Lee et al. 2024, "CATS: Contextually-Aware
Thresholding for Sparsity in Large Language Models", arXiv:2404.08763; ScalingIntelligence/CATS).

``a = act(gate_proj(x))`` is computed densely; entries with ``|a| <= t`` are zeroed, and with them the
matching rows of ``up_proj`` (output sparsity: not computed at batch 1) and input channels of
``down_proj`` (a :class:`SparseInputLinear` with threshold 0 skips exact zeros). ``t`` is the
``s``-quantile of ``|a|`` over calibration data (CATS: a histogram of ``|a|``; here TEAL's 10,000-bin
histogram between the 1%/99% quantiles, on ``|a|``). gate_proj stays dense, so sparsity ``s`` skips
``2s/3`` of the MLP's weight bytes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparseforge.activation.cats import CATSMLP
    >>> class MLP(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
    ...         self.act_fn = nn.SiLU()
    ...     def forward(self, x):
    ...         return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    >>> mlp = MLP()
    >>> x = torch.randn(1, 8)
    >>> torch.allclose(CATSMLP(mlp, threshold=0.0)(x), mlp(x), atol=1e-6)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparseforge.activation.linear import SparseInputLinear
from sparseforge.errors import ConfigError, ModelError

__all__ = ["CATSMLP", "is_swiglu_mlp"]


def is_swiglu_mlp(module: nn.Module) -> bool:
    """Has ``gate_proj``, ``up_proj``, ``down_proj`` (``nn.Linear``) and ``act_fn``: a Llama-style GLU MLP."""
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and (
        callable(getattr(module, "act_fn", None)))


class CATSMLP(nn.Module):
    """A SwiGLU MLP whose gate output is thresholded (CATS); replaces the model's MLP module."""

    def __init__(self, mlp: nn.Module, threshold: float = 0.0) -> None:
        super().__init__()
        if not is_swiglu_mlp(mlp):
            raise ModelError(f"CATS needs a GLU MLP with gate_proj, up_proj, down_proj and act_fn; got {type(mlp).__name__}")
        self.gate_proj, self.up_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.act_fn
        self.up_act = getattr(mlp, "up_act", None)  # dReLU: ReLU on up_proj's output (zeros skipped too)
        self.down_proj = SparseInputLinear.from_linear(mlp.down_proj, threshold=0.0)  # skips the zeroed channels
        self.register_buffer("threshold", torch.zeros(1))
        self.activation_info: dict = {}  # method / sparsity / calibrated_sparsity recorded by calibration
        self.set_threshold(threshold)

    def set_threshold(self, threshold: float) -> None:
        t = float(threshold)
        if not t >= 0.0:
            raise ConfigError(f"CATS threshold must be >= 0 (0 = dense), got {threshold!r}")
        self.threshold = torch.tensor([t])

    def forward(self, x: Tensor) -> Tensor:
        a = self.act_fn(self.gate_proj(x))  # (..., ffn)
        skip = a.abs() <= self.threshold.to(a.dtype)
        a = torch.where(skip, torch.zeros((), dtype=a.dtype), a)
        if x.numel() == x.shape[-1]:  # one token: only the kept rows of up_proj are read
            kept = (~skip).reshape(-1).nonzero().squeeze(1)  # (k,)
            u = torch.zeros_like(a).reshape(-1)
            w = self.up_proj.weight.index_select(0, kept)  # (k, in)
            b = None if self.up_proj.bias is None else self.up_proj.bias.index_select(0, kept)
            u[kept] = nn.functional.linear(x.reshape(-1), w, b)
            u = u.reshape(a.shape)
        else:
            u = self.up_proj(x)
        if self.up_act is not None:
            u = self.up_act(u)
        return self.down_proj(a * u)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold.item():.4g}"
