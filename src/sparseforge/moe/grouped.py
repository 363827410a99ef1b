"""Expert FFNs on expert-sorted slices (forward and a hand-written backward).

Input: the tokens ``x`` (T, d), a :class:`~sparseforge.moe.dispatch.DispatchPlan` and the gate
weight of each assignment. The plan's token list is sorted by expert; each expert with a
non-empty slice gathers its tokens, runs its FFN on them, scales the outputs by the gate weights
and adds them back per token. :class:`GroupedFFN` is a custom autograd function: its backward runs
the same slices (weight gradients of experts that received no token are exactly zero).

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
from sparseforge.moe.dispatch import DispatchPlan, add_rows

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


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """The backend for ``tensors`` (input and weights); an inapplicable request is a ConfigError."""
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


def _mm(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    """``a @ b`` for one slice: ``a`` (n, K), ``b`` (K, N), views allowed -> (n, N)."""
    if _use_onednn(a, backend):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")  # a @ (b^T)^T
    return torch.mm(a, b)


def _mm_add(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    """``c + a @ b`` (may reuse ``c``)."""
    if _use_onednn(a, backend):
        return torch.ops.mkldnn._linear_pointwise.binary(a, c, b.t(), None, "add")
    return c.addmm_(a, b)


def _slices(counts: list[int]) -> Iterator[tuple[int, int, int]]:
    """``(expert, start, end)`` of every non-empty slice, in expert order."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
            start += n


def _expert(x_e, e, w_up, w_down, w_gate, act, backend):
    """One expert on its slice ``x_e`` (n, d): pre-activations ``a``, ``b`` (n, h) (``b`` None for
    MLP experts) and the unweighted output (n, d)."""
    if w_gate is None:
        a, b = _mm(x_e, w_up[e], backend), None  # (n, h)
        hid = act(a)
    else:
        a = _mm(x_e, w_gate[e], backend)  # (n, h)
        b = _mm(x_e, w_up[e], backend)  # (n, h)
        hid = act(a).mul_(b)  # (n, h)
    return a, b, _mm(hid, w_down[e], backend)  # (n, d)


def _stack(parts: dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(E, ., .) gradient from per-expert parts; zero for experts without tokens."""
    zero = None
    full = []
    for e in range(like.shape[0]):
        if e in parts:
            full.append(parts[e])
        else:
            zero = like.new_zeros(like.shape[1:]) if zero is None else zero
            full.append(zero)
    return torch.stack(full)


class GroupedFFN(torch.autograd.Function):
    """``out[t] = sum over t's assignments of weight * FFN_e(x[t])``; first-order differentiable.

    Everything runs slice by slice (gather, three matmuls, weighted scatter-add), so no (S, d)
    tensor is ever materialised: big fresh allocations cost page faults on every call.
    """

    @staticmethod
    def forward(ctx, x, slot_weight, w_up, w_down, w_gate, token, counts, activation, backend):
        act = ACTIVATIONS[activation][0]
        out = torch.zeros_like(x)  # (T, d)
        saved = []
        for e, s, t in _slices(counts):
            tok = token[s:t]  # (n,)
            x_e = x.index_select(0, tok)  # (n, d)
            a, b, y = _expert(x_e, e, w_up, w_down, w_gate, act, backend)
            add_rows(out, tok, y * slot_weight[s:t].unsqueeze(1))
            saved.append((x_e, a, b, y))  # intermediates: never seen or modified by the caller
        ctx.save_for_backward(slot_weight, token, w_up, w_down, w_gate)
        ctx.saved, ctx.counts, ctx.activation, ctx.backend = saved, counts, activation, backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        slot_weight, token, w_up, w_down, w_gate = ctx.saved_tensors
        act, act_bwd = ACTIVATIONS[ctx.activation]
        backend = ctx.backend
        need_x, need_w, need_up, need_down, need_gate = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        grad_x = torch.zeros_like(grad_out) if need_x else None  # (T, d)
        grad_weight = torch.zeros_like(slot_weight) if need_w else None  # (S,)
        g_up, g_down, g_gate = {}, {}, {}
        for (e, s, t), (x_e, a, b, y) in zip(_slices(ctx.counts), ctx.saved):
            tok = token[s:t]  # (n,)
            gy = grad_out.index_select(0, tok)  # (n, d) gradient w.r.t. the weighted output
            if need_w:
                grad_weight[s:t] = torch.linalg.vecdot(gy, y)  # (n,)
            gy.mul_(slot_weight[s:t].unsqueeze(1))  # (n, d) gradient w.r.t. the expert output
            act_a = act(a)  # (n, h)
            if need_down:
                g_down[e] = _mm(act_a.t() if b is None else (act_a * b).t(), gy, backend)  # (h, d)
            g_hid = _mm(gy, w_down[e].t(), backend)  # (n, h)
            if b is None:
                g_a = act_bwd(g_hid, a)  # (n, h)
                if need_up:
                    g_up[e] = _mm(x_e.t(), g_a, backend)  # (d, h)
                if need_x:
                    add_rows(grad_x, tok, _mm(g_a, w_up[e].t(), backend))  # (n, d)
            else:
                g_b = g_hid * act_a  # (n, h)
                g_a = act_bwd(g_hid.mul_(b), a)  # (n, h)
                if need_gate:
                    g_gate[e] = _mm(x_e.t(), g_a, backend)  # (d, h)
                if need_up:
                    g_up[e] = _mm(x_e.t(), g_b, backend)  # (d, h)
                if need_x:
                    add_rows(grad_x, tok, _mm_add(_mm(g_a, w_gate[e].t(), backend), g_b, w_up[e].t(), backend))
        return (
            grad_x,
            grad_weight,
            _stack(g_up, w_up) if need_up else None,
            _stack(g_down, w_down) if need_down else None,
            _stack(g_gate, w_gate) if need_gate else None,
            None, None, None, None,
        )


def grouped_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    plan: DispatchPlan,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    activation: str = "silu",
    backend: str = "auto",
) -> torch.Tensor:
    """Mixture output (T, d) for tokens ``x`` (T, d) routed by ``plan`` with gate ``weights`` (T, k).

    Differentiable w.r.t. ``x``, ``weights`` and the expert weights (first order).
    """
    backend = resolve_backend(backend, x, w_up, w_down)
    slot_weight = weights.reshape(-1).index_select(0, plan.slot).to(x.dtype)  # (S,)
    args = (x, slot_weight, w_up, w_down, w_gate, plan.token, plan.counts, activation, backend)
    tensors = (x, slot_weight, w_up, w_down) + ((w_gate,) if w_gate is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return GroupedFFN.apply(*args)
    act = ACTIVATIONS[activation][0]  # forward only: nothing kept
    out = torch.zeros_like(x)  # (T, d)
    for e, s, t in _slices(plan.counts):
        tok = plan.token[s:t]  # (n,)
        _, _, y = _expert(x.index_select(0, tok), e, w_up, w_down, w_gate, act, backend)  # (n, d)
        add_rows(out, tok, y.mul_(slot_weight[s:t].unsqueeze(1)))
    return out


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
