"""Oracles for the MoE tests: every expert on every token, weighted by a dense gate matrix."""

from __future__ import annotations

import torch

from sparseforge.moe.grouped import ACTIVATIONS


def dense_gates(experts: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, k) choices and weights -> dense (T, E) gate matrix; empty slots (-1) add nothing."""
    valid = experts >= 0
    gates = torch.zeros(experts.shape[0], num_experts, dtype=weights.dtype)
    return gates.scatter_add(1, experts.clamp_min(0), weights * valid)  # (T, E), differentiable


def expert_outputs(x, w_up, w_down, w_gate=None, activation="silu"):
    """(E, T, d): expert e applied to every token."""
    act = ACTIVATIONS[activation][0]
    outs = []
    for e in range(w_up.shape[0]):
        if w_gate is None:
            hid = act(x @ w_up[e])
        else:
            hid = act(x @ w_gate[e]) * (x @ w_up[e])
        outs.append(hid @ w_down[e])
    return torch.stack(outs)


def dense_moe(x, experts, weights, w_up, w_down, w_gate=None, activation="silu"):
    """Naive mixture: sum_e G[t, e] * FFN_e(x[t])."""
    gates = dense_gates(experts, weights, w_up.shape[0]).to(x.dtype)  # (T, E)
    outs = expert_outputs(x, w_up, w_down, w_gate, activation)  # (E, T, d)
    return torch.einsum("te,etd->td", gates, outs)
