"""One definition of the three custom ops of a sparse format, their checks and their autograd.

Every format has the same three ops over its buffers (``<fmt>`` is ``csr``, ``bitmap``, ``nm``,
``fanin`` or ``bsr``; ``W...`` its weight buffers, ``S...`` its integer statics, e.g. N:M's ``n, m``):

* ``sparseforge::<fmt>_linear(x, W..., S..., bias)``: ``y (B, out) = x (B, in) @ W^T + bias``,
  native ``<fmt>_linear``;
* ``sparseforge::<fmt>_linear_t(dy, W..., S..., in_features)``: ``dx (B, in) = dy (B, out) @ W``,
  native ``<fmt>_linear_t``;
* ``sparseforge::<fmt>_linear_dw(x, dy, W..., S...)``: dW at the mask, float32 in the layout of
  ``values`` (``dw[q] = sum_b dy[b, r_q] * x[b, c_q]``), native ``<fmt>_sddmm``.

:func:`define` registers them (schema, fake impl, autograd: ``dx`` by the transposed op, dW at the
mask by the SDDMM op cast to the values' dtype, ``dbias = dy.sum(0)``) from the buffer names and
a ``fit(*W, *S, cols) -> out`` function that checks how the buffers fit together. Every registered op checks all
its arguments; :meth:`FormatOps.kernel_args` validates a format object's buffers once and keeps
their numpy views on it for the eager fast path of :func:`sparseforge.ops.linear`.

Example:
    >>> from sparseforge.ops import csr
    >>> csr.OPS.native_names
    ('csr_linear', 'csr_linear_t', 'csr_sddmm')
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from sparseforge.errors import DataError, ModelError
from sparseforge.kernels import native

VALUE_DTYPES = (torch.float32, torch.bfloat16)
INDEX_DTYPES = (torch.uint16, torch.int32)  # column indices: the narrowest type for the width
_CACHE = "_kernel_args"  # attribute of a format object: (out rows, numpy views of its buffers)


def check_act(t: Tensor, name: str, features: int, what: str) -> None:
    if t.device.type != "cpu":
        raise DataError(f"{name} is on {t.device}; the sparse kernels run on the CPU")
    if t.dtype != torch.float32:
        raise DataError(f"{name} must be float32, got {t.dtype}; call .float() first")
    if t.dim() != 2 or t.shape[1] != features:
        raise DataError(f"{name} must have shape (batch, {features}) to match the weight's {what}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise DataError(f"{name} must be contiguous; call .contiguous() first")


def check_bias(bias: Optional[Tensor], out: int) -> None:
    if bias is None:
        return
    if bias.device.type != "cpu" or bias.dtype != torch.float32 or tuple(bias.shape) != (out,) or not bias.is_contiguous():
        raise DataError(
            f"bias must be a contiguous float32 CPU tensor of shape ({out},), got {bias.dtype} {tuple(bias.shape)} on {bias.device}"
        )


def check_buf(t: Tensor, name: str, dtypes: tuple, dim: int) -> None:
    if t.device.type != "cpu" or t.dtype not in dtypes or t.dim() != dim or not t.is_contiguous():
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ModelError(
            f"weight buffer {name} must be a contiguous {dim}-D {want} CPU tensor, got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def np_view(t):
    """Zero-copy numpy view for the native call (bf16 as its raw uint16 bits; ints pass through);
    ~3x cheaper per tensor than handing torch tensors to nanobind through DLPack."""
    if not isinstance(t, Tensor):
        return t
    if t.requires_grad:
        t = t.detach()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def linear_out(x: Tensor, out: int, bias: Optional[Tensor], fake: bool = False) -> Tensor:
    """Checks x and bias against a weight with ``out`` rows; the (B, out) output to fill (or fake)."""
    check_act(x, "x", x.shape[-1], "input features")
    check_bias(bias, out)
    return x.new_empty(x.shape[0], out) if fake else torch.empty(x.shape[0], out, dtype=torch.float32)


def _t_out(dy: Tensor, out: int, in_features: int, fake: bool = False) -> Tensor:
    """Checks dy against a weight with ``out`` rows; the (B, in) dx to fill (or fake)."""
    check_act(dy, "dy", out, "output features")
    return dy.new_empty(dy.shape[0], in_features) if fake else torch.empty(dy.shape[0], in_features, dtype=torch.float32)


def _dw_out(x: Tensor, dy: Tensor, values: Tensor, rows: int) -> Tensor:
    check_act(x, "x", x.shape[-1], "input features")
    check_act(dy, "dy", rows, "output features")
    if x.shape[0] != dy.shape[0]:
        raise DataError(f"x ({x.shape[0]} rows) and dy ({dy.shape[0]} rows) must have the same batch")
    return torch.empty(values.shape, dtype=torch.float32)


@dataclass(frozen=True)
class FormatOps:
    """The registered ops of one format and how to call them with a format object."""

    fmt: str
    weight_cls: type
    unpack: Callable  # format object -> (W..., S...) in op argument order
    dims: Callable  # (W..., S..., cols) -> out rows; raises ModelError on bad buffers
    linear: object  # the registered ops (torch CustomOpDef)
    linear_t: object
    linear_dw: object

    @property
    def native_names(self) -> tuple[str, str, str]:
        return (f"{self.fmt}_linear", f"{self.fmt}_linear_t", f"{self.fmt}_sddmm")

    def kernel_args(self, weight) -> tuple:
        """``(native forward, out rows, numpy views of W..., S...)`` for a format object.

        The buffers are checked like the registered op checks them, indices and row pointers
        included (native ``<fmt>_check``), once per object and again only when a buffer's storage
        changed (``param.data = ...``, e.g. ``Module.half()`` on trainable values: checked by data
        pointer, which cannot be reused while the cached view holds the old storage); the returned
        forward then skips the per-call index scans. Format objects are frozen and validated at
        construction; writing into their index buffers in place is not supported (a numpy view shares
        its tensor's memory: in-place updates of the values are seen). Deep copies and pickles drop
        the views (``StoredBuffers.__getstate__``).
        """
        cached = weight.__dict__.get(_CACHE)
        if cached is not None:
            kernel, rows, arrays, tensors, ptrs = cached
            if all(t.data_ptr() == p for t, p in zip(tensors, ptrs)):
                return kernel, rows, arrays
        args = self.unpack(weight)
        rows = self.dims(*args, weight.shape[1])
        if rows != weight.shape[0]:
            raise ModelError(f"{type(weight).__name__} buffers describe {rows} rows, not {weight.shape[0]}")
        tensors = tuple(a for a in args if isinstance(a, Tensor))
        arrays = tuple(np_view(a) for a in args)
        getattr(native(), f"{self.fmt}_check")(*arrays, rows, weight.shape[1])  # ModelError naming the bad entry
        kernel = partial(getattr(native(), self.native_names[0]), check_indices=False)
        cached = (kernel, rows, arrays, tensors, tuple(t.data_ptr() for t in tensors))
        object.__setattr__(weight, _CACHE, cached)
        return cached[:3]


@dataclass(frozen=True)
class _Signature:
    """What the three ops of one format take: weight buffer names, integer statics, the shape check."""

    fmt: str
    cls_name: str
    weight: tuple[str, ...]  # buffer names, in argument order
    statics: tuple[str, ...]  # integer arguments after the buffers (N:M's n, m)
    dims: Callable  # (W..., S..., cols) -> out rows; raises ModelError on bad buffers

    @property
    def n_w(self) -> int:
        return len(self.weight) + len(self.statics)

    @property
    def values_at(self) -> int:
        """Input position of the stored values in the forward op (``x`` is 0)."""
        return 1 + self.weight.index("values")

    @property
    def schema(self) -> str:
        return ", ".join([f"Tensor {n}" for n in self.weight] + [f"SymInt {s}" for s in self.statics])


def _register_ops(s: _Signature):
    """The three custom ops of a format (native implementations and fake impls)."""
    dims, values_at = s.dims, s.values_at
    fwd_name, t_name, dw_name = (f"{s.fmt}_linear", f"{s.fmt}_linear_t", f"{s.fmt}_sddmm")

    def forward(x, *args):
        *wargs, bias = args
        y = linear_out(x, dims(*wargs, x.shape[-1]), bias)
        getattr(native(), fwd_name)(np_view(x), *map(np_view, wargs), np_view(bias), y.numpy())
        return y

    def transposed(dy, *args):
        *wargs, in_features = args
        dx = _t_out(dy, dims(*wargs, in_features), in_features)
        getattr(native(), t_name)(np_view(dy), *map(np_view, wargs), dx.numpy())
        return dx

    def sddmm(x, dy, *wargs):
        dw = _dw_out(x, dy, wargs[values_at - 1], dims(*wargs, x.shape[-1]))
        getattr(native(), dw_name)(np_view(x), np_view(dy), *map(np_view, wargs), dw.numpy())
        return dw

    forward.__doc__ = f"y (B, out) = x (B, in) @ W^T + bias for a {s.cls_name}."
    transposed.__doc__ = f"dx (B, in) = dy (B, out) @ W for a {s.cls_name}."
    sddmm.__doc__ = f"dW at the mask for a {s.cls_name}: float32, shaped like ``values``."
    lin = torch.library.custom_op(f"sparseforge::{s.fmt}_linear", forward, mutates_args=(),
                                  schema=f"(Tensor x, {s.schema}, Tensor? bias) -> Tensor")
    lin_t = torch.library.custom_op(f"sparseforge::{s.fmt}_linear_t", transposed, mutates_args=(),
                                    schema=f"(Tensor dy, {s.schema}, SymInt in_features) -> Tensor")
    lin_dw = torch.library.custom_op(f"sparseforge::{s.fmt}_linear_dw", sddmm, mutates_args=(),
                                     schema=f"(Tensor x, Tensor dy, {s.schema}) -> Tensor")

    @lin.register_fake
    def _(x, *args):
        *wargs, bias = args
        return linear_out(x, dims(*wargs, x.shape[-1]), bias, fake=True)

    @lin_t.register_fake
    def _(dy, *args):
        *wargs, in_features = args
        return _t_out(dy, dims(*wargs, in_features), in_features, fake=True)

    @lin_dw.register_fake
    def _(x, dy, *wargs):
        dims(*wargs, x.shape[-1])
        values = wargs[values_at - 1]
        return values.new_empty(values.shape, dtype=torch.float32)

    return lin, lin_t, lin_dw


def _register_autograd(s: _Signature, lin, lin_t, lin_dw) -> None:
    """``dx`` by the transposed op, dW at the mask by the SDDMM op (cast to the values' dtype), ``dbias``."""
    n_w, values_at, n_weight = s.n_w, s.values_at, len(s.weight)

    def setup_context(ctx, inputs, output):
        x, wargs = inputs[0], inputs[1:1 + n_w]
        # x is kept only when the stored values need their gradient (dW at the mask reads it)
        tensors = [a for a in wargs if isinstance(a, Tensor)]
        ctx.save_for_backward(x if inputs[values_at].requires_grad else None, *tensors)
        ctx.statics = tuple(wargs[n_weight:])
        ctx.in_features = x.shape[1]
        ctx.has_bias = inputs[-1] is not None

    def backward(ctx, dy):
        x, *bufs = ctx.saved_tensors
        wargs = (*bufs, *ctx.statics)
        dy = dy.contiguous()
        grads = [None] * (n_w + 2)  # x, W..., S..., bias
        if ctx.needs_input_grad[0]:
            grads[0] = lin_t(dy, *wargs, ctx.in_features)
        if ctx.needs_input_grad[values_at]:
            # float32 accumulate, cast to the values' dtype
            grads[values_at] = lin_dw(x, dy, *wargs).to(bufs[values_at - 1].dtype)
        if ctx.has_bias and ctx.needs_input_grad[-1]:
            grads[-1] = dy.sum(0)
        return tuple(grads)

    lin.register_autograd(backward, setup_context=setup_context)


def define(fmt: str, weight_cls: type, buffers: tuple[tuple[str, tuple, int], ...], fit: Callable, *,
           statics: tuple[str, ...] = (), unpack: Optional[Callable] = None) -> FormatOps:
    """Register ``sparseforge::<fmt>_linear``, ``_linear_t`` and ``_linear_dw`` (see the module doc).

    ``buffers``: ``(name, allowed dtypes, ndim)`` of each weight buffer, in argument order (each must
    be a contiguous CPU tensor); ``fit(*W, *S, cols) -> out rows`` checks how they fit together.
    """
    weight = tuple(name for name, _, _ in buffers)

    def dims(*args):
        for (name, dtypes, ndim), t in zip(buffers, args):
            check_buf(t, name, dtypes, ndim)
        return fit(*args)

    sig = _Signature(fmt, weight_cls.__name__, weight, tuple(statics), dims)
    lin, lin_t, lin_dw = _register_ops(sig)
    _register_autograd(sig, lin, lin_t, lin_dw)
    if unpack is None:
        def unpack(w):
            return tuple(getattr(w, n) for n in weight)
    return FormatOps(fmt, weight_cls, unpack, dims, lin, lin_t, lin_dw)
