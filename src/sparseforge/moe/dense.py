"""A one-expert MoE layer as the plain MLP it computes (the end point of expert pruning).

With softmax top-k, Switch or SparseMixer routing a layer with a single expert weights it by
exactly 1 (a softmax over one logit), so the layer is a plain MLP: :func:`to_dense` builds that
:class:`DenseMLP` with ``nn.Linear`` layers ``(out, in)``, so the one-shot weight-pruning methods
and :func:`sparseforge.compress_` apply to it. A shared expert (and its sigmoid gate) is kept.

Example:
    >>> import torch
    >>> from sparseforge.moe import MoE
    >>> from sparseforge.moe.expert_pruning import prune_experts
    >>> mlp = to_dense(prune_experts(MoE(8, 16, num_experts=4, k=2), [2]))
    >>> mlp(torch.randn(3, 8)).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

import torch
from torch import nn

from sparseforge.errors import ConfigError
from sparseforge.moe.grouped import ACTIVATIONS
from sparseforge.moe.layer import MoE
from sparseforge.moe.routers import SoftmaxTopK, SwitchTop1
from sparseforge.moe.sparsemixer import SparseMixer

__all__ = ["DenseMLP", "to_dense"]


class DenseMLP(nn.Module):
    """A plain (gated) MLP: ``down(act(gate(x)) * up(x))`` (or ``down(act(up(x)))``), plus an
    optional shared expert scaled by ``sigmoid(shared_gate(x))``; ``nn.Linear`` layers (out, in)."""

    def __init__(self, w_up: torch.Tensor, w_down: torch.Tensor, w_gate: torch.Tensor | None, activation: str,
                 shared: "DenseMLP | None" = None, shared_gate: torch.Tensor | None = None) -> None:
        super().__init__()
        d, h = w_up.shape  # input-major (d, h)
        kw = {"device": w_up.device, "dtype": w_up.dtype}
        self.activation = activation
        self.gate_proj = None if w_gate is None else nn.Linear(d, h, bias=False, **kw)
        self.up_proj = nn.Linear(d, h, bias=False, **kw)
        self.down_proj = nn.Linear(h, d, bias=False, **kw)
        with torch.no_grad():
            self.up_proj.weight.copy_(w_up.t())  # (h, d)
            self.down_proj.weight.copy_(w_down.t())  # (d, h)
            if w_gate is not None:
                self.gate_proj.weight.copy_(w_gate.t())
        self.shared = shared
        self.shared_gate = None
        if shared_gate is not None:
            self.shared_gate = nn.Linear(d, 1, bias=False, **kw)
            with torch.no_grad():
                self.shared_gate.weight.copy_(shared_gate)  # (1, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation][0]
        if self.gate_proj is None:
            hid = act(self.up_proj(x))  # (..., h)
        else:
            hid = act(self.gate_proj(x)) * self.up_proj(x)
        y = self.down_proj(hid)  # (..., d)
        if self.shared is not None:
            s = self.shared(x)
            y = y + (torch.sigmoid(self.shared_gate(x)) * s if self.shared_gate is not None else s)
        return y


def to_dense(moe: MoE) -> DenseMLP:
    """The plain MLP a one-expert layer computes. Raises :class:`ConfigError` when the layer's
    single expert is not always weighted 1 (sigmoid or expert-choice routing, capacity drops)."""
    if moe.num_experts != 1:
        raise ConfigError(f"to_dense needs a layer with one expert, this one has {moe.num_experts}; prune first")
    if not isinstance(moe.router, (SoftmaxTopK, SwitchTop1, SparseMixer)):
        raise ConfigError(
            f"{type(moe.router).__name__} routing weights its single expert by a learned score, not 1: "
            "the layer is not a plain MLP"
        )
    if moe.capacity_factor is not None and moe.capacity_factor < 1.0:
        raise ConfigError(f"capacity_factor={moe.capacity_factor} < 1 drops tokens: the layer is not a plain MLP")
    shared = None
    if moe.shared is not None:
        s = moe.shared
        shared = DenseMLP(s.w_up.detach(), s.w_down.detach(), None if s.w_gate is None else s.w_gate.detach(),
                          moe.activation)
    gate = None if moe.shared_gate is None else moe.shared_gate.weight.detach()
    w_gate = None if moe.w_gate is None else moe.w_gate[0].detach()
    return DenseMLP(moe.w_up[0].detach(), moe.w_down[0].detach(), w_gate, moe.activation, shared, gate).train(moe.training)
