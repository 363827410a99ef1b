"""Expert FFNs on expert-sorted slices (forward and a hand-written backward).

Input: the tokens ``x`` (T, d), a :class:`~sparseforge.moe.dispatch.DispatchPlan` and the gate
weight of each assignment. The plan's token list is sorted by expert; each expert with a
non-empty slice gathers its tokens and runs its FFN on them, writing its output rows into one
(S + 1, d) buffer in sorted order; :func:`~sparseforge.moe.dispatch.combine_slots` then gathers
each token's ``k`` rows and sums them weighted by the gates (no scatter-add).
:class:`GroupedFFN` is a custom autograd function: its backward runs the same slices and combines
the input gradient the same way (weight gradients of experts that received no token are exactly
zero).

Expert weights are stacked and input-major: GLU (SwiGLU when ``activation="silu"``): ``w_gate``,
``w_up`` (E, d, h), ``w_down`` (E, h, d), ``y = (act(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``;
plain MLP (``w_gate=None``): ``y = act(x @ w_up[e]) @ w_down[e]``.

Matmul backends (see ``docs/moe.md`` for measurements):

* ``"loop"``: ``torch.mm`` per slice (public torch API; MKL on x86).
* ``"onednn"`` (opt-in): oneDNN float32 matmul through ``torch.ops.mkldnn._linear_pointwise``, a
  private op of torch (the one its inductor CPU backend uses; :data:`ONEDNN_SCHEMA` is the signature
  this module calls, checked before use) for slices of at least :data:`ONEDNN_MIN_ROWS` rows,
  ``torch.mm`` for smaller ones (a decode step's matrix-vector products). Same results up to float32
  rounding; on some CPUs about 2x faster than MKL's float32 GEMM (``docs/moe.md``). A private op can
  change in any torch release, so it is never chosen implicitly; if this torch lacks it (or its
  signature changed) asking for it is a :class:`ConfigError`.
* ``"auto"``: ``loop``.
* a :class:`~sparseforge.moe.bf16x3.Bf16x3Matmul` (``MoE(matmul_precision="bf16x3")``, opt-in): the
  float32-accurate bf16x3 AMX kernel (relative error ~5e-6 instead of float32's ~6e-7) with the
  expert weights split and packed once (``docs/moe.md``).

``torch.nn.functional.grouped_mm`` (torch 2.13 has a CPU kernel) ran at the speed of the ``loop``
backend in our measurements (it calls the same GEMM per group), so it is not offered.

Example:
    >>> import torch
    >>> from sparseforge.moe.dispatch import build_plan
    >>> from sparseforge.moe.grouped import grouped_ffn
    >>> E, d, h = 3, 4, 5
    >>> plan = build_plan(torch.tensor([[0, 2], [2, -1]]), E)
    >>> weights = torch.tensor([[0.7, 0.3], [1.0, 0.0]])
    >>> w_gate, w_up, w_down = torch.randn(E, d, h), torch.randn(E, d, h), torch.randn(E, h, d)
    >>> grouped_ffn(torch.randn(2, d), weights, plan, w_up, w_down, w_gate).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.nn.functional as F

from sparseforge.errors import ConfigError
from sparseforge.moe.bf16x3 import Bf16x3Matmul
from sparseforge.moe.dispatch import DispatchPlan, combine_slots

__all__ = [
    "grouped_ffn", "few_tokens_ffn", "GroupedFFN", "resolve_backend", "onednn_missing", "BACKENDS", "ONEDNN_MIN_ROWS",
    "ONEDNN_SCHEMA", "FEW_SLOTS", "ACTIVATIONS",
]

_aten = torch.ops.aten

# name -> (forward, backward(grad_out, pre_activation))
ACTIVATIONS = {
    "silu": (F.silu, lambda g, a: _aten.silu_backward(g, a)),
    "gelu": (F.gelu, lambda g, a: _aten.gelu_backward(g, a)),
    "gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), lambda g, a: _aten.gelu_backward(g, a, approximate="tanh")),
    "relu": (F.relu, lambda g, a: _aten.threshold_backward(g, a, 0)),
}

BACKENDS = ("auto", "onednn", "loop")

# Slices with fewer rows (or a shorter inner dimension) go to torch.mm: for a matrix-vector
# product oneDNN's per-call setup costs more than it saves.
ONEDNN_MIN_ROWS = 4


# Forward-only calls with at most this many routing slots (T * k; a decode step) skip the sort:
# each slot is one matrix-vector chain whose weighting and accumulation fuse into ``addmm_``.
FEW_SLOTS = 16


# The private oneDNN ops "onednn" calls, with the signatures this module was written against.
ONEDNN_SCHEMA = {
    "default": "mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, "
               "str? algorithm) -> Tensor Y",
    "binary": "mkldnn::_linear_pointwise.binary(Tensor X, Tensor other, Tensor W, Tensor? B, str attr) -> Tensor Y",
}


@functools.cache  # torch does not change within a process; checked once
def onednn_missing() -> str | None:
    """Why this torch cannot run the ``"onednn"`` backend (no oneDNN, no op, another signature), or None."""
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN (torch.backends.mkldnn)"
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return f"torch {torch.__version__} has no torch.ops.mkldnn._linear_pointwise"
    for overload, schema in ONEDNN_SCHEMA.items():
        found = str(getattr(op, overload)._schema) if hasattr(op, overload) else None
        if found != schema:
            return f"torch {torch.__version__}'s mkldnn._linear_pointwise.{overload} is {found}, not {schema}"
    return None


def resolve_backend(backend: "str | Bf16x3Matmul", *tensors: torch.Tensor) -> "str | Bf16x3Matmul":
    """The backend for ``tensors`` (input and weights); an inapplicable request is a ConfigError."""
    if isinstance(backend, Bf16x3Matmul):
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
            raise ConfigError("matmul_precision='bf16x3' takes float32 CPU inputs and weights; use matmul_precision='fp32'")
        return backend
    if backend not in BACKENDS:
        raise ConfigError(f"unknown dispatch backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        return "loop"
    if backend == "onednn":
        why = onednn_missing()
        if why is None and not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
            why = "it takes float32 CPU tensors only"
        if why is not None:
            raise ConfigError(f"backend='onednn' (a private torch op, opt-in) is unavailable: {why}; use backend='loop'")
    return backend


def _use_onednn(a: torch.Tensor, backend: str) -> bool:
    return backend == "onednn" and a.shape[0] >= ONEDNN_MIN_ROWS and a.shape[1] >= ONEDNN_MIN_ROWS


def _mm(a: torch.Tensor, b: torch.Tensor, backend, key=None) -> torch.Tensor:
    """``a @ b`` for one slice: ``a`` (n, K), ``b`` (K, N), views allowed -> (n, N); ``key`` names
    ``b`` as an expert weight (bf16x3 keeps its packed form)."""
    if isinstance(backend, Bf16x3Matmul):
        return backend.mm(a, b, key)
    if _use_onednn(a, backend):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")  # a @ (b^T)^T
    return torch.mm(a, b)


def _mm_add(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend, key=None) -> torch.Tensor:
    """``c += a @ b`` in place; returns ``c``."""
    if isinstance(backend, Bf16x3Matmul):
        return backend.mm(a, b, key, out=c, accumulate=True)
    if _use_onednn(a, backend):
        return c.copy_(torch.ops.mkldnn._linear_pointwise.binary(a, c, b.t(), None, "add"))
    return c.addmm_(a, b)


def _slices(counts: list[int]) -> Iterator[tuple[int, int, int]]:
    """``(expert, start, end)`` of every non-empty slice, in expert order."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
            start += n


def _expert(x_e, e, w_up, w_down, w_gate, act, backend, out):
    """One expert on its slice ``x_e`` (n, d): pre-activations ``a``, ``b`` (n, h) (``b`` None for
    MLP experts); the unweighted output (n, d) is written into ``out``."""
    if w_gate is None:
        a, b = _mm(x_e, w_up[e], backend, ("up", e)), None  # (n, h)
        hid = act(a)
    else:
        a = _mm(x_e, w_gate[e], backend, ("gate", e))  # (n, h)
        b = _mm(x_e, w_up[e], backend, ("up", e))  # (n, h)
        hid = act(a).mul_(b)  # (n, h)
    _mm_into(out, hid, w_down[e], backend, ("down", e))  # (n, d)
    return a, b


def _row_buffer(num_slots: int, like: torch.Tensor) -> torch.Tensor:
    """(S + 1, d) rows in sorted slot order; the last row is the zero row empty slots point to."""
    rows = like.new_empty(num_slots + 1, like.shape[1])
    rows[num_slots].zero_()
    return rows


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend, key=None) -> torch.Tensor:
    """``out = a @ b`` written into ``out`` (a contiguous view, e.g. one expert's gradient slice)."""
    if isinstance(backend, Bf16x3Matmul):
        return backend.mm(a, b, key, out=out)
    if _use_onednn(a, backend):
        return out.copy_(_mm(a, b, backend))
    return torch.mm(a, b, out=out)


def _zero_unfilled(grad: torch.Tensor, filled: set[int]) -> torch.Tensor:
    """Zero the (E, ., .) gradient rows of experts that received no tokens; returns ``grad``."""
    for e in range(grad.shape[0]):
        if e not in filled:
            grad[e].zero_()
    return grad


class GroupedFFN(torch.autograd.Function):
    """``out[t] = sum over t's assignments of weight * FFN_e(x[t])``; first-order differentiable.

    The experts run slice by slice (gather, three matmuls) into one (S + 1, d) row buffer in
    sorted order; the weighted per-token sum is a gather (:func:`combine_slots`). The backward
    runs the same slices and combines the input gradient the same way.
    """

    @staticmethod
    def forward(ctx, x, weights, w_up, w_down, w_gate, token, slot, position, counts, activation, backend):
        act = ACTIVATIONS[activation][0]
        rows = _row_buffer(token.numel(), x)  # (S + 1, d) unweighted expert outputs
        saved = []
        for e, s, t in _slices(counts):
            x_e = x.index_select(0, token[s:t])  # (n, d)
            a, b = _expert(x_e, e, w_up, w_down, w_gate, act, backend, rows[s:t])
            saved.append((x_e, a, b))  # intermediates: never seen or modified by the caller
        out = combine_slots(rows, position, weights)  # (T, d)
        ctx.save_for_backward(weights, token, slot, position, w_up, w_down, w_gate, rows)
        ctx.saved, ctx.counts, ctx.activation, ctx.backend = saved, counts, activation, backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        weights, token, slot, position, w_up, w_down, w_gate, rows = ctx.saved_tensors
        act, act_bwd = ACTIVATIONS[ctx.activation]
        backend = ctx.backend
        need_x, need_w, need_up, need_down, need_gate = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()  # (T, d)
        num_slots = token.numel()
        slot_weight = weights.reshape(-1).index_select(0, slot)  # (S,) gate of each sorted assignment
        grad_rows = _row_buffer(num_slots, grad_out) if need_x else None  # (S + 1, d) input grads, sorted
        grad_sorted = grad_out.new_zeros(num_slots + 1) if need_w else None  # (S + 1,) gate grads, sorted
        # Expert weight gradients (E, ., .) are written slice by slice in place: no per-expert
        # temporaries stacked afterwards (a copy as large as the weights).
        g_up = torch.empty_like(w_up) if need_up else None
        g_down = torch.empty_like(w_down) if need_down else None
        g_gate = torch.empty_like(w_gate) if need_gate else None
        filled = set()
        for (e, s, t), (x_e, a, b) in zip(_slices(ctx.counts), ctx.saved):
            filled.add(e)
            gy = grad_out.index_select(0, token[s:t])  # (n, d) gradient w.r.t. the weighted output
            if need_w:
                grad_sorted[s:t] = torch.linalg.vecdot(gy, rows[s:t])  # (n,)
            gy.mul_(slot_weight[s:t].unsqueeze(1))  # (n, d) gradient w.r.t. the expert output
            act_a = act(a)  # (n, h)
            if need_down:
                _mm_into(g_down[e], act_a.t() if b is None else (act_a * b).t(), gy, backend)  # (h, d)
            g_hid = _mm(gy, w_down[e].t(), backend, ("down_t", e))  # (n, h)
            if b is None:
                g_a = act_bwd(g_hid, a)  # (n, h)
                if need_up:
                    _mm_into(g_up[e], x_e.t(), g_a, backend)  # (d, h)
                if need_x:
                    _mm_into(grad_rows[s:t], g_a, w_up[e].t(), backend, ("up_t", e))  # (n, d)
            else:
                g_b = g_hid * act_a  # (n, h)
                g_a = act_bwd(g_hid.mul_(b), a)  # (n, h)
                if need_gate:
                    _mm_into(g_gate[e], x_e.t(), g_a, backend)  # (d, h)
                if need_up:
                    _mm_into(g_up[e], x_e.t(), g_b, backend)  # (d, h)
                if need_x:
                    _mm_into(grad_rows[s:t], g_a, w_gate[e].t(), backend, ("gate_t", e))  # (n, d)
                    _mm_add(grad_rows[s:t], g_b, w_up[e].t(), backend, ("up_t", e))
        return (
            combine_slots(grad_rows, position) if need_x else None,
            grad_sorted.index_select(0, position.reshape(-1)).view_as(weights) if need_w else None,
            _zero_unfilled(g_up, filled) if need_up else None,
            _zero_unfilled(g_down, filled) if need_down else None,
            _zero_unfilled(g_gate, filled) if need_gate else None,
            None, None, None, None, None, None,
        )


def grouped_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    plan: DispatchPlan,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    activation: str = "silu",
    backend: "str | Bf16x3Matmul" = "auto",
) -> torch.Tensor:
    """Mixture output (T, d) for tokens ``x`` (T, d) routed by ``plan`` with gate ``weights`` (T, k).

    Differentiable w.r.t. ``x``, ``weights`` and the expert weights (first order).
    """
    backend = resolve_backend(backend, x, w_up, w_down)
    weights = weights.to(x.dtype)  # (T, k)
    position = plan.position.view(weights.shape)  # (T, k)
    tensors = (x, weights, w_up, w_down) + ((w_gate,) if w_gate is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return GroupedFFN.apply(
            x, weights, w_up, w_down, w_gate, plan.token, plan.slot, position, plan.counts, activation, backend,
        )
    act = ACTIVATIONS[activation][0]  # forward only: nothing kept
    rows = _row_buffer(plan.token.numel(), x)  # (S + 1, d)
    for e, s, t in _slices(plan.counts):
        _expert(x.index_select(0, plan.token[s:t]), e, w_up, w_down, w_gate, act, backend, rows[s:t])
    return combine_slots(rows, position, weights)  # (T, d)


def few_tokens_ffn(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """Forward-only mixture for a handful of tokens (decode): no sort, no gather, no scatter.

    ``x`` (T, d), ``experts`` / ``weights`` (T, k) as a router returns them (-1 = empty slot).
    Same result as :func:`grouped_ffn` up to float rounding order.
    """
    act = ACTIVATIONS[activation][0]
    out = torch.zeros_like(x)  # (T, d)
    for t, (row_e, row_w) in enumerate(zip(experts.tolist(), weights.tolist())):
        x_t = x[t:t + 1]  # (1, d)
        for e, w in zip(row_e, row_w):
            if e < 0:
                continue
            if w_gate is None:
                hid = act(torch.mm(x_t, w_up[e]))  # (1, h)
            else:
                hid = act(torch.mm(x_t, w_gate[e])).mul_(torch.mm(x_t, w_up[e]))  # (1, h)
            out[t:t + 1].addmm_(hid, w_down[e], alpha=w)  # (1, d) += w * hid @ w_down[e]
    return out
