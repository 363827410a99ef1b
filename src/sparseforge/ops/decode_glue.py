"""The element-wise steps of a decoder layer between its projections, as single native calls (float32 or bfloat16).

Native code ``csrc/decode_glue.h`` (AVX-512 / AVX2 / portable vector width, chosen at run time; scalar
oracles ``*_ref``). At batch-1 decode sizes torch spends more time dispatching the five to eight small ops
of each step than computing them (a 2048-wide RMSNorm: ~38 us as five torch ops, ~2 us as one native call,
on a Zen 3 host); the native decode engine (:mod:`sparseforge.generation.engine`) calls these instead.

* :func:`rms_norm`: Llama's RMSNorm ``weight * (h * rsqrt(mean(h^2) + eps))`` per row, after
  ``h += residual`` in place when a residual is given (the residual add that precedes every norm of a
  decoder layer);
* :func:`swiglu`: ``silu(gate) * up`` for ``gate_up = [gate | up]`` (the fused gate/up projection's output);
* :func:`rope_kv_`: the rotary embedding of one position for the q and k heads of a fused q/k/v output
  (``q cos + rotate_half(q) sin``, the model's own arithmetic, bitwise), q into a buffer and k, v into
  the KV cache at that position.

bfloat16 buffers round where the model's bf16 forward rounds: the residual sum, ``h * r`` and its product with
the weight, ``silu(gate)`` and its product with ``up``, each rotary product and their sum (:func:`to_bf16` rounds
the float32 attention output for the o projection). The norm's sum of squares and SiLU's exponential differ
from torch's in the last bits (float32 rounding
of another summation order, a polynomial exp), so a decode step agrees with the model's forward to float
rounding, not bitwise. The ``bind_*`` functions return zero-copy, pre-checked callables for a decode loop
(a call is one native call, ~2-6 us).

Example:
    >>> import torch
    >>> from sparseforge.ops.decode_glue import rms_norm, swiglu
    >>> h = torch.tensor([[3.0, 4.0]])
    >>> rms_norm(h, torch.ones(2), 0.0).tolist()                  # h / sqrt((9 + 16) / 2)
    [[0.8485281467437744, 1.1313709020614624]]
    >>> swiglu(torch.tensor([[0.0, 2.0]])).tolist()             # silu(0) * 2
    [[0.0]]
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from sparseforge.errors import DataError
from sparseforge.kernels import native
from sparseforge.ops._define import np_view

__all__ = ["rms_norm", "rms_norm_ref", "swiglu", "swiglu_ref", "rope_kv_", "bind_rms_norm", "bind_swiglu", "bind_rope_kv", "to_bf16",
           "bind_to_bf16"]


DTYPES = (torch.float32, torch.bfloat16)


def _check_buffer(t: Tensor, name: str, dim: int, dtypes: tuple = DTYPES) -> None:
    if not isinstance(t, Tensor) or t.dtype not in dtypes or t.dim() != dim or not t.is_contiguous() or not t.is_cpu:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        kinds = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise DataError(f"{name} must be a contiguous {dim}-D {kinds} CPU tensor, got {got}")


def _call(fn: Callable, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except ValueError as exc:  # the binding's one-line message names the argument
        raise DataError(str(exc)) from None


def _norm_args(h: Tensor, weight: Tensor, out: Optional[Tensor], residual: Optional[Tensor]) -> Tensor:
    _check_buffer(h, "h", 2)
    _check_buffer(weight, "weight", 1)
    if residual is not None:
        _check_buffer(residual, "residual", 2)
    if out is None:
        out = torch.empty_like(h)
    _check_buffer(out, "out", 2)
    return out


def rms_norm(h: Tensor, weight: Tensor, eps: float, out: Optional[Tensor] = None, residual: Optional[Tensor] = None,
             isa: str = "") -> Tensor:
    """``weight * (h * rsqrt(mean(h^2, -1) + eps))`` for float32 ``h (rows, n)``, into ``out`` (may be ``h``); with
    ``residual (rows, n)``, ``h += residual`` first, in place. ``isa``: ``""`` (the best path), ``"scalar"``,
    ``"avx2"`` or ``"avx512"``."""
    out = _norm_args(h, weight, out, residual)
    _call(native().rms_norm, np_view(h), np_view(weight), float(eps), np_view(out),
          residual=None if residual is None else np_view(residual), isa=isa)
    return out


def rms_norm_ref(h: Tensor, weight: Tensor, eps: float, out: Optional[Tensor] = None,
                 residual: Optional[Tensor] = None) -> Tensor:
    """:func:`rms_norm` by the scalar oracle (sum of squares in double)."""
    out = _norm_args(h, weight, out, residual)
    _call(native().rms_norm_ref, np_view(h), np_view(weight), float(eps), np_view(out),
          residual=None if residual is None else np_view(residual))
    return out


def _swiglu_out(gate_up: Tensor, out: Optional[Tensor]) -> Tensor:
    _check_buffer(gate_up, "gate_up", 2)
    if out is None:
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
    _check_buffer(out, "out", 2)
    return out


def swiglu(gate_up: Tensor, out: Optional[Tensor] = None, isa: str = "") -> Tensor:
    """``silu(gate) * up`` for float32 ``gate_up (rows, 2 f) = [gate | up]``, as ``(rows, f)`` (into ``out``)."""
    out = _swiglu_out(gate_up, out)
    _call(native().swiglu, np_view(gate_up), np_view(out), isa=isa)
    return out


def swiglu_ref(gate_up: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """:func:`swiglu` by the scalar oracle (double, ``std::exp``)."""
    out = _swiglu_out(gate_up, out)
    _call(native().swiglu_ref, np_view(gate_up), np_view(out))
    return out


def _rope_args(qkv: Tensor, cos: Tensor, ssin: Tensor, heads: int, q: Tensor, k: Tensor, v: Tensor) -> None:
    for t, name, dim in ((qkv, "qkv", 2), (cos, "cos", 2), (ssin, "ssin", 2), (k, "k", 4), (v, "v", 4)):
        _check_buffer(t, name, dim, (qkv.dtype,) if name != "qkv" else DTYPES)
    _check_buffer(q, "q", 3, (torch.float32,))
    _, kv_heads, cap, d = k.shape
    expected = {"k": (1, kv_heads, cap, d), "v": tuple(k.shape), "q": (1, heads, d), "qkv": (1, (heads + 2 * kv_heads) * d),
                "cos": (cap, d), "ssin": (cap, d)}
    for name, t in (("k", k), ("v", v), ("q", q), ("qkv", qkv), ("cos", cos), ("ssin", ssin)):
        if tuple(t.shape) != expected[name]:
            raise DataError(f"{name} must be {expected[name]} for {heads} query heads and k {tuple(k.shape)} "
                            f"(1, Hkv, cap, D), got {tuple(t.shape)}")
    if d % 2 or heads < 1 or kv_heads < 1:
        raise DataError(f"rope_kv needs heads >= 1, Hkv >= 1 and an even head size, got {heads}, {kv_heads}, {d}")


def rope_kv_(qkv: Tensor, cos: Tensor, ssin: Tensor, heads: int, q: Tensor, k: Tensor, v: Tensor, pos: int) -> None:
    """Rotate the q and k heads of ``qkv (1, (heads + 2 Hkv) D)`` (q heads, k heads, v heads) at position ``pos``:
    ``x cos + rotate_half(x) sin`` with ``cos`` and ``ssin = [-sin, +sin]`` (over the two halves of ``D``) tables
    ``(cap, D)``; q into ``q (1, heads, D)``, k into ``k (1, Hkv, cap, D)`` at token ``pos``, v copied into ``v``
    at token ``pos``."""
    _rope_args(qkv, cos, ssin, heads, q, k, v)
    _call(native().rope_kv, np_view(qkv), np_view(cos), np_view(ssin), int(heads), np_view(q), np_view(k), np_view(v), int(pos))


def bind_rms_norm(h: Tensor, weight: Tensor, eps: float, out: Tensor, residual: Optional[Tensor] = None,
                  isa: str = "") -> Callable[[], None]:
    """:func:`rms_norm` over fixed buffers, checked once (one call here): ``fn()`` recomputes ``out`` (and
    ``h += residual``) from the buffers' current contents."""
    rms_norm(h.clone(), weight, eps, out.clone(), None if residual is None else residual.clone(), isa=isa)
    return partial(native().rms_norm, np_view(h), np_view(weight), float(eps), np_view(out),
                   residual=None if residual is None else np_view(residual), isa=isa)


def bind_swiglu(gate_up: Tensor, out: Tensor, isa: str = "") -> Callable[[], None]:
    """:func:`swiglu` over fixed buffers, checked once: ``fn()`` recomputes ``out`` from ``gate_up``."""
    swiglu(gate_up, out.clone(), isa=isa)
    return partial(native().swiglu, np_view(gate_up), np_view(out), isa=isa)


def bind_rope_kv(qkv: Tensor, cos: Tensor, ssin: Tensor, heads: int, q: Tensor, k: Tensor, v: Tensor) -> Callable[[int], None]:
    """:func:`rope_kv_` over fixed buffers, checked once (on copies): ``fn(pos)`` rotates and writes position ``pos``
    (a position outside the cache raises ``ValueError``)."""
    _rope_args(qkv, cos, ssin, heads, q, k, v)
    return partial(native().rope_kv, np_view(qkv), np_view(cos), np_view(ssin), int(heads), np_view(q), np_view(k), np_view(v))


def to_bf16(src: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """float32 ``src`` rounded to bfloat16 (to nearest even, as ``src.to(torch.bfloat16)``), into ``out``."""
    _check_buffer(src, "src", src.dim() if isinstance(src, Tensor) else 1, (torch.float32,))
    if out is None:
        out = torch.empty(src.shape, dtype=torch.bfloat16)
    _check_buffer(out, "out", src.dim(), (torch.bfloat16,))
    _call(native().to_bf16, np_view(src), np_view(out))
    return out


def bind_to_bf16(src: Tensor, out: Tensor) -> Callable[[], None]:
    """:func:`to_bf16` over fixed buffers, checked once: ``fn()`` rounds ``src``'s current contents into ``out``."""
    to_bf16(src, out.clone())
    return partial(native().to_bf16, np_view(src), np_view(out))
