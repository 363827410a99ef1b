"""Sort-based MoE dispatch on CPU: group assignments by expert, one GEMM chain per expert.

The ``S`` kept (token, expert) assignments are sorted by expert (one stable sort of the flat
expert ids), so each expert's tokens form a contiguous slice of the gathered input
``xs = x[token]`` ``(S, d)``. Each expert with a non-empty slice runs its FFN on that slice
(plain ``torch.mm`` into preallocated buffers: no per-expert boolean masks over all tokens, no
padding), the results are scaled by the gate weights and summed back per token with
``index_add``. :class:`GroupedFFN` is a custom autograd function whose backward writes each
expert's weight gradient straight into its slice of the gradient tensor; experts that received
no token get a zero gradient.

Expert weights are stored stacked and "input-major" so a slice is multiplied without a
transpose: GLU (SwiGLU when ``activation="silu"``): ``w_gate``, ``w_up`` ``(E, d, h)``,
``w_down`` ``(E, h, d)``, ``y = (act(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``; plain MLP
(``w_gate=None``): ``y = act(x @ w_up[e]) @ w_down[e]``.

We measured ``torch.nn.functional.grouped_mm`` (torch 2.13 has a CPU kernel) against this loop;
see ``docs/moe.md`` for the numbers.

Example:
    >>> import torch
    >>> from sparseforge.moe.dispatch import build_plan, grouped_ffn
    >>> E, d, h = 3, 4, 5
    >>> x = torch.randn(2, d)
    >>> experts = torch.tensor([[0, 2], [2, -1]])  # token 1 has one empty slot
    >>> weights = torch.tensor([[0.7, 0.3], [1.0, 0.0]])
    >>> plan = build_plan(experts, E)
    >>> plan.counts
    [1, 0, 2]
    >>> w_gate, w_up, w_down = torch.randn(E, d, h), torch.randn(E, d, h), torch.randn(E, h, d)
    >>> grouped_ffn(x, weights, plan, w_up, w_down, w_gate).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparseforge.errors import ConfigError

__all__ = ["DispatchPlan", "build_plan", "apply_capacity", "grouped_ffn", "ACTIVATIONS", "GroupedFFN"]

_aten = torch.ops.aten

# name -> (forward, backward(grad_out, pre_activation))
ACTIVATIONS = {
    "silu": (F.silu, lambda g, a: _aten.silu_backward(g, a)),
    "gelu": (F.gelu, lambda g, a: _aten.gelu_backward(g, a)),
    "gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), lambda g, a: _aten.gelu_backward(g, a, approximate="tanh")),
    "relu": (F.relu, lambda g, a: _aten.threshold_backward(g, a, 0)),
}


class DispatchPlan(NamedTuple):
    """Assignments grouped by expert. ``S`` = number of non-empty slots."""

    token: torch.Tensor  # (S,) token of each assignment, grouped by expert
    slot: torch.Tensor  # (S,) flat index into the (T * k) routing slots
    counts: list[int]  # (E,) assignments per expert; slices are consecutive in expert order


def build_plan(experts: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Sort the slots of ``experts`` (T, k) by expert; empty slots (-1) are left out."""
    k = experts.shape[1]
    flat = experts.reshape(-1)  # (T*k,)
    order = torch.sort(flat, stable=True).indices  # (T*k,) empty slots (-1) first
    counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()  # (E+1,)
    if len(counts) > num_experts + 1:
        raise ConfigError(f"routing chose expert {len(counts) - 2} but the layer has {num_experts} experts")
    slot = order[counts[0]:]  # (S,)
    return DispatchPlan(slot // k, slot, counts[1:])


def apply_capacity(
    experts: torch.Tensor, weights: torch.Tensor, capacity: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep at most ``capacity`` assignments per expert; the rest become empty slots.

    Priority: all first choices before any second choice, then token order (GShard/Switch).
    Returns ``(experts, weights, number dropped)``.
    """
    num_tokens, k = experts.shape
    flat = experts.t().reshape(-1)  # (k*T,) choice-major
    order = torch.sort(flat, stable=True).indices  # (k*T,)
    sorted_e = flat[order]
    counts = torch.bincount(flat + 1, minlength=num_experts + 1)  # (E+1,)
    start = torch.cumsum(counts, 0) - counts  # (E+1,) first position of each expert (and of -1)
    pos = torch.arange(flat.numel(), device=flat.device) - start[sorted_e + 1]  # (k*T,) rank in expert
    over_sorted = (pos >= capacity) & (sorted_e >= 0)
    over = torch.empty_like(over_sorted)
    over[order] = over_sorted
    drop = over.view(k, num_tokens).t()  # (T, k)
    return experts.masked_fill(drop, -1), weights.masked_fill(drop, 0.0), int(over_sorted.sum())


def _ffn_slice(xs, w_gate, w_up, w_down, act, out, a_buf=None, b_buf=None):
    """One expert on a contiguous slice: writes ``out`` (n, d); keeps pre-activations if buffers given."""
    if w_gate is None:
        a = torch.mm(xs, w_up, out=a_buf) if a_buf is not None else xs @ w_up  # (n, h)
        hid = act(a)
    else:
        a = torch.mm(xs, w_gate, out=a_buf) if a_buf is not None else xs @ w_gate  # (n, h)
        b = torch.mm(xs, w_up, out=b_buf) if b_buf is not None else xs @ w_up  # (n, h)
        hid = act(a).mul_(b)  # (n, h)
    torch.mm(hid, w_down, out=out)  # (n, d)


class GroupedFFN(torch.autograd.Function):
    """``out[t] = sum over t's assignments of weight * FFN_e(x[t])`` with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, slot_weight, w_up, w_down, w_gate, token, counts, activation):
        act = ACTIVATIONS[activation][0]
        num_assign = token.numel()
        hidden = w_up.shape[2]
        xs = x.index_select(0, token)  # (S, d)
        ys = x.new_empty(num_assign, w_down.shape[2])  # (S, d) unweighted expert outputs
        a_all = x.new_empty(num_assign, hidden)  # (S, h) pre-activation (gate branch for GLU)
        b_all = x.new_empty(num_assign, hidden) if w_gate is not None else None  # (S, h) up branch
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            end = start + n
            _ffn_slice(
                xs[start:end], None if w_gate is None else w_gate[e], w_up[e], w_down[e], act,
                ys[start:end], a_all[start:end], None if b_all is None else b_all[start:end],
            )
            start = end
        out = torch.zeros_like(x).index_add_(0, token, ys * slot_weight.unsqueeze(1))  # (T, d)
        ctx.save_for_backward(xs, ys, a_all, b_all, slot_weight, token, w_up, w_down, w_gate)
        ctx.counts, ctx.activation, ctx.num_tokens = counts, activation, x.shape[0]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xs, ys, a_all, b_all, slot_weight, token, w_up, w_down, w_gate = ctx.saved_tensors
        act, act_bwd = ACTIVATIONS[ctx.activation]
        need_x, need_w, need_up, need_down, need_gate = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        gys = grad_out.index_select(0, token)  # (S, d)
        grad_weight = (gys * ys).sum(1) if need_w else None  # (S,)
        gys.mul_(slot_weight.unsqueeze(1))  # (S, d) gradient w.r.t. the unweighted outputs
        g_up = torch.empty_like(w_up) if need_up else None
        g_down = torch.empty_like(w_down) if need_down else None
        g_gate = torch.empty_like(w_gate) if need_gate else None
        gxs = torch.empty_like(xs) if need_x else None  # (S, d)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                for g in (g_up, g_down, g_gate):
                    if g is not None:
                        g[e].zero_()
                continue
            end = start + n
            x_e, gy, a = xs[start:end], gys[start:end], a_all[start:end]  # (n, d), (n, d), (n, h)
            act_a = act(a)  # (n, h)
            if w_gate is None:
                hid = act_a
            else:
                b = b_all[start:end]  # (n, h)
                hid = act_a * b
            if g_down is not None:
                torch.mm(hid.t(), gy, out=g_down[e])  # (h, d)
            g_hid = gy @ w_down[e].t()  # (n, h)
            if w_gate is None:
                g_a = act_bwd(g_hid, a)  # (n, h)
                if g_up is not None:
                    torch.mm(x_e.t(), g_a, out=g_up[e])  # (d, h)
                if gxs is not None:
                    torch.mm(g_a, w_up[e].t(), out=gxs[start:end])  # (n, d)
            else:
                g_b = g_hid * act_a  # (n, h)
                g_a = act_bwd(g_hid.mul_(b), a)  # (n, h)
                if g_gate is not None:
                    torch.mm(x_e.t(), g_a, out=g_gate[e])  # (d, h)
                if g_up is not None:
                    torch.mm(x_e.t(), g_b, out=g_up[e])  # (d, h)
                if gxs is not None:
                    torch.mm(g_a, w_gate[e].t(), out=gxs[start:end])  # (n, d)
                    gxs[start:end].addmm_(g_b, w_up[e].t())
            start = end
        grad_x = None
        if gxs is not None:
            grad_x = grad_out.new_zeros(ctx.num_tokens, xs.shape[1]).index_add_(0, token, gxs)  # (T, d)
        return grad_x, grad_weight, g_up, g_down, g_gate, None, None, None


def _grouped_ffn_inference(x, slot_weight, w_up, w_down, w_gate, token, counts, activation):
    """Forward only: no saved activations, in-place elementwise ops."""
    act = ACTIVATIONS[activation][0]
    xs = x.index_select(0, token)  # (S, d)
    ys = x.new_empty(token.numel(), w_down.shape[2])  # (S, d)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        end = start + n
        _ffn_slice(xs[start:end], None if w_gate is None else w_gate[e], w_up[e], w_down[e], act, ys[start:end])
        start = end
    ys.mul_(slot_weight.unsqueeze(1))
    return torch.zeros_like(x).index_add_(0, token, ys)  # (T, d)


def grouped_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    plan: DispatchPlan,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """Mixture output ``(T, d)`` for tokens ``x`` (T, d) routed by ``plan`` with gate ``weights`` (T, k).

    Differentiable w.r.t. ``x``, ``weights`` and the expert weights.
    """
    slot_weight = weights.reshape(-1).index_select(0, plan.slot).to(x.dtype)  # (S,)
    args = (x, slot_weight, w_up, w_down, w_gate, plan.token, plan.counts, activation)
    tensors = (x, slot_weight, w_up, w_down) + ((w_gate,) if w_gate is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return GroupedFFN.apply(*args)
    return _grouped_ffn_inference(*args)
