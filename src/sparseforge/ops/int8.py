"""``sparseforge::bitmap_i8_linear`` / ``nm_i8_linear`` / ``csr_i8_linear``: weights with int8 values.

The values are int8 ``q`` with a float32 scale per output row (:mod:`sparseforge.formats.quantized`):
``y[b, r] = scales[r] * sum_j q[r, j] * x[b, j] + bias[r]``, native ``bitmap_i8_linear`` /
``nm_i8_linear`` / ``csr_i8_linear`` (``csrc/int8.h``: batch 1-3 dequantize in registers, larger batches one row block at a
time into the float32 lanes kernels). Schemas:

* ``sparseforge::bitmap_i8_linear(x, bitmap, row_offsets, values, scales, bias, act="float")``
* ``sparseforge::nm_i8_linear(x, values, indices, scales, n, m, bias, act="float")``
* ``sparseforge::csr_i8_linear(x, row_ptr, col, values, scales, bias)``

Activation modes (bitmap and N:M; :data:`ACTIVATIONS`): ``act="float"`` (default) multiplies float32
``x``; ``act="int8"`` quantizes each row of ``x`` once per call (symmetric, ``sx[b] = max_j |x[b, j]| / 127``)
and sums ``q * xq`` exactly in integers (AVX512 VNNI ``vpdpbusd``, AVX2 byte products, or a portable
integer loop; the same result on every path): ``y[b, r] = scales[r] * sx[b] * sum_j q[r, j] * xq[b, j] + bias[r]``.
It changes the numerics (``docs/kernels.md`` gives the measured error); a call whose ``x`` holds NaN or
inf runs the float mode. CSR has float activations only.

Autograd: ``dx = dy @ W`` through the float32 transposed ops of the format on the dequantized values,
``dbias = dy.sum(0)``; int8 values and their scales get no gradient (they are not trainable).
``act="int8"`` is inference-only: called with an input that requires grad it raises
:class:`~sparseforge.errors.ConfigError` (use ``act="float"`` to train through the layer).

Example:
    >>> import torch
    >>> from sparseforge.formats import BitmapWeight
    >>> from sparseforge.ops.int8 import bitmap_i8_linear
    >>> w = BitmapWeight.from_dense(torch.tensor([[254., 0., -126.]]), values_dtype=torch.int8)  # scale 2, q = (127, -63)
    >>> bitmap_i8_linear(torch.ones(1, 3), w.bitmap, w.row_offsets, w.values, w.scales, None).tolist()
    [[128.0]]
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import ConfigError
from sparseforge.formats.bitmap import BitmapWeight
from sparseforge.formats.csr import CSRWeight
from sparseforge.formats.nm import NMWeight
from sparseforge.kernels import native
from sparseforge.ops import bitmap as bitmap_ops
from sparseforge.ops import csr as csr_ops
from sparseforge.ops import nm as nm_ops
from sparseforge.ops._define import FormatOps, check_buf, linear_out, np_view

__all__ = ["bitmap_i8_linear", "nm_i8_linear", "csr_i8_linear", "BITMAP_I8", "NM_I8", "CSR_I8", "ACTIVATIONS",
           "INT8_ACT_FORMATS", "check_activations"]

ACTIVATIONS = ("float", "int8")  # activation modes of the int8-valued ops
INT8_ACT_FORMATS = ("bitmap", "nm")  # kernel families with the int8-activation mode


def check_activations(activations: str) -> str:
    """``activations`` if it names an activation mode (:data:`ACTIVATIONS`); ConfigError otherwise."""
    if activations not in ACTIVATIONS:
        raise ConfigError(f"activations must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activations!r}")
    return activations


def inference_only(activations: str) -> ConfigError:
    """The error of a call that needs a gradient through the int8-activation mode."""
    return ConfigError(f"activations={activations!r} is inference-only (quantized x has no gradient); run under "
                       "torch.no_grad() or switch the layer to activations='float' to train through it")

_SCALES = ("scales", (torch.float32,), 1)


def _bitmap_dims(bitmap: Tensor, row_offsets: Tensor, values: Tensor, scales: Tensor, cols: int) -> int:
    buffers = (("bitmap", (torch.uint8,), 2), ("row_offsets", (torch.int64,), 1), ("values", (torch.int8,), 1), _SCALES)
    for (name, dtypes, ndim), t in zip(buffers, (bitmap, row_offsets, values, scales)):
        check_buf(t, name, dtypes, ndim)
    return bitmap_ops.fit_buffers(bitmap, row_offsets, values, cols)


def _nm_dims(values: Tensor, indices: Tensor, scales: Tensor, n: int, m: int, cols: int) -> int:
    for (name, dtypes, ndim), t in zip((("values", (torch.int8,), 2), ("indices", (torch.uint8,), 2), _SCALES),
                                       (values, indices, scales)):
        check_buf(t, name, dtypes, ndim)
    return nm_ops.fit_buffers(values, indices, n, m, cols)


def _csr_dims(row_ptr: Tensor, col: Tensor, values: Tensor, scales: Tensor, cols: int) -> int:
    buffers = (("row_ptr", (torch.int32,), 1), ("col", (torch.uint16, torch.int32), 1), ("values", (torch.int8,), 1), _SCALES)
    for (name, dtypes, ndim), t in zip(buffers, (row_ptr, col, values, scales)):
        check_buf(t, name, dtypes, ndim)
    return csr_ops.fit_buffers(row_ptr, col, values, cols)


def _setup(ctx, inputs, output):
    if isinstance(inputs[-1], str):  # bitmap / N:M: (x, W..., S..., bias, act)
        if inputs[-1] != "float":
            raise inference_only(inputs[-1])
        weight, bias = inputs[1:-2], inputs[-2]
    else:  # CSR: (x, W..., bias)
        weight, bias = inputs[1:-1], inputs[-1]
    ctx.save_for_backward(*(t for t in weight if isinstance(t, Tensor)))
    ctx.statics = tuple(a for a in weight if not isinstance(a, Tensor))
    ctx.in_features = inputs[0].shape[1]
    ctx.n_inputs = len(inputs)
    ctx.bias_at = 1 + len(weight)
    ctx.has_bias = bias is not None


def _bitmap_backward(ctx, dy):
    bitmap, row_offsets, values, scales = ctx.saved_tensors
    grads = [None] * ctx.n_inputs
    if ctx.needs_input_grad[0]:
        deq = values.float() * torch.repeat_interleave(scales, row_offsets.diff())  # (nnz,) float32
        grads[0] = bitmap_ops.bitmap_linear_t(dy.contiguous(), bitmap, row_offsets, deq, ctx.in_features)
    if ctx.has_bias and ctx.needs_input_grad[ctx.bias_at]:
        grads[ctx.bias_at] = dy.sum(0)
    return tuple(grads)


def _nm_backward(ctx, dy):
    values, indices, scales = ctx.saved_tensors
    n, m = ctx.statics
    grads = [None] * ctx.n_inputs
    if ctx.needs_input_grad[0]:
        deq = (values.float() * scales[:, None]).contiguous()  # (rows, G*n) float32
        grads[0] = nm_ops.nm_linear_t(dy.contiguous(), deq, indices, n, m, ctx.in_features)
    if ctx.has_bias and ctx.needs_input_grad[ctx.bias_at]:
        grads[ctx.bias_at] = dy.sum(0)
    return tuple(grads)


def _csr_backward(ctx, dy):
    row_ptr, col, values, scales = ctx.saved_tensors
    grads = [None] * ctx.n_inputs
    if ctx.needs_input_grad[0]:
        deq = values.float() * torch.repeat_interleave(scales, row_ptr.to(torch.int64).diff())  # (nnz,) float32
        grads[0] = csr_ops.csr_linear_t(dy.contiguous(), row_ptr, col, deq, ctx.in_features)
    if ctx.has_bias and ctx.needs_input_grad[ctx.bias_at]:
        grads[ctx.bias_at] = dy.sum(0)
    return tuple(grads)


def _define(fmt: str, weight_schema: str, dims, backward, with_act: bool):
    """Register ``sparseforge::<fmt>_i8_linear(Tensor x, <weight_schema>, Tensor? bias[, str act]) -> Tensor``:
    ``y (B, out) = x (B, in) @ W^T + bias`` by the native ``<fmt>_i8_linear``, its fake (the output
    shape from ``dims(*weight args, in)``, which also checks the buffers) and its autograd.
    ``with_act``: the op takes the activation mode (module doc) after ``bias``."""
    name = f"{fmt}_i8_linear"

    def split(args):  # (weight buffers and statics, bias, native kwargs); act may be left out (its default)
        if with_act and isinstance(args[-1], str):
            return args[:-2], args[-2], {"act": check_activations(args[-1])}
        return args[:-1], args[-1], {}

    def forward(x, *args):  # args: the weight's buffers and statics, bias[, act]
        wargs, bias, kw = split(args)
        y = linear_out(x, dims(*wargs, x.shape[-1]), bias)
        getattr(native(), name)(np_view(x), *map(np_view, wargs), np_view(bias), y.numpy(), **kw)
        return y

    def fake(x, *args):
        wargs, bias, _ = split(args)
        return linear_out(x, dims(*wargs, x.shape[-1]), bias, fake=True)

    act_schema = ', str act="float"' if with_act else ""
    op = torch.library.custom_op(f"sparseforge::{name}", forward, mutates_args=(),
                                 schema=f"(Tensor x, {weight_schema}, Tensor? bias{act_schema}) -> Tensor")
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=_setup)
    return op


csr_i8_linear = _define("csr", "Tensor row_ptr, Tensor col, Tensor values, Tensor scales", _csr_dims, _csr_backward,
                        with_act=False)
bitmap_i8_linear = _define("bitmap", "Tensor bitmap, Tensor row_offsets, Tensor values, Tensor scales", _bitmap_dims,
                           _bitmap_backward, with_act=True)
nm_i8_linear = _define("nm", "Tensor values, Tensor indices, Tensor scales, SymInt n, SymInt m", _nm_dims, _nm_backward,
                       with_act=True)

BITMAP_I8 = FormatOps("bitmap_i8", BitmapWeight, lambda w: (w.bitmap, w.row_offsets, w.values, w.scales), _bitmap_dims,
                      bitmap_i8_linear, None, None)
NM_I8 = FormatOps("nm_i8", NMWeight, lambda w: (w.values, w.indices, w.scales, w.pattern.n, w.pattern.m), _nm_dims,
                  nm_i8_linear, None, None)
CSR_I8 = FormatOps("csr_i8", CSRWeight, lambda w: (w.row_ptr, w.col, w.values, w.scales), _csr_dims, csr_i8_linear,
                   None, None)
