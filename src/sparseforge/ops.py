"""Torch custom ops over the native sparse kernels: ``y = x @ W^T + bias`` for every sparse format.

Layering (STYLE.md habit 5): ``csrc/`` torch-free C++ kernels -> ``sparseforge._native`` (nanobind,
raw buffers) -> this module (``torch.library.custom_op`` with fake impls and autograd) -> modules.
Each op takes the format's buffers as tensors, so it works in eager mode, under ``torch.compile``
(the fake impl gives shapes) and in training:

* ``sparseforge::csr_linear(x, row_ptr, col, values, bias)``
* ``sparseforge::bitmap_linear(x, bitmap, row_offsets, values, bias)``
* ``sparseforge::nm_linear(x, values, indices, n, m, bias)``
* ``sparseforge::fanin_linear(x, values, indices, bias)``
* ``sparseforge::bsr_linear(x, block_row_ptr, block_col, values, bias)``

``x`` is float32 ``(B, in)``, C-contiguous, on the CPU; ``values`` float32 or bfloat16; the output is
float32 ``(B, out)``. CSR buffers do not record ``in``, so ``csr_linear`` takes it from ``x``;
:func:`linear` checks ``x`` against the weight's shape for every format. NaN/inf propagate as in the dense product with the pruned weights set to zero.

Autograd: ``dx = dy @ W`` runs the native transposed-product kernels (``sparseforge::*_linear_t``:
batch in SIMD lanes, compiled per ISA, not yet tuned), ``dbias = dy.sum(0)``, and the gradient of
the stored values, dW restricted to the mask, runs the native SDDMM kernels
(``sparseforge::*_linear_dw``: ``dw[q] = sum_b dy[b, r_q] * x[b, c_q]`` for each stored entry ``q``
at ``(r_q, c_q)``, float32 accumulate, in the layout of ``values``; cast to the values' dtype). So
``values.requires_grad_()`` trains the kept weights while the structure stays fixed.

Example:
    >>> import torch
    >>> from sparseforge.formats import BitmapWeight
    >>> from sparseforge.ops import linear
    >>> w = torch.tensor([[1., 0., 2.], [0., 0., -1.]])
    >>> linear(torch.ones(1, 3), BitmapWeight.from_dense(w)).tolist()
    [[3.0, -1.0]]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparseforge.errors import DataError, ModelError
from sparseforge.kernels import native

__all__ = [
    "linear", "csr_linear", "bitmap_linear", "nm_linear", "csr_linear_t", "bitmap_linear_t", "nm_linear_t",
    "csr_linear_dw", "bitmap_linear_dw", "nm_linear_dw", "fanin_linear", "fanin_linear_t", "fanin_linear_dw",
    "bsr_linear", "bsr_linear_t", "bsr_linear_dw",
]

_VALUE_DTYPES = (torch.float32, torch.bfloat16)


def _check_act(t: Tensor, name: str, features: int, what: str) -> None:
    if t.device.type != "cpu":
        raise DataError(f"{name} is on {t.device}; the sparse kernels run on the CPU")
    if t.dtype != torch.float32:
        raise DataError(f"{name} must be float32, got {t.dtype}; call .float() first")
    if t.dim() != 2 or t.shape[1] != features:
        raise DataError(f"{name} must have shape (batch, {features}) to match the weight's {what}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise DataError(f"{name} must be contiguous; call .contiguous() first")


def _check_bias(bias: Optional[Tensor], out: int) -> None:
    if bias is None:
        return
    if bias.device.type != "cpu" or bias.dtype != torch.float32 or tuple(bias.shape) != (out,) or not bias.is_contiguous():
        raise DataError(
            f"bias must be a contiguous float32 CPU tensor of shape ({out},), got {bias.dtype} {tuple(bias.shape)} on {bias.device}"
        )


def _check_buf(t: Tensor, name: str, dtypes: tuple, dim: int) -> None:
    if t.device.type != "cpu" or t.dtype not in dtypes or t.dim() != dim or not t.is_contiguous():
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ModelError(
            f"weight buffer {name} must be a contiguous {dim}-D {want} CPU tensor, got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def _csr_dims(row_ptr: Tensor, col: Tensor, values: Tensor) -> int:
    _check_buf(row_ptr, "row_ptr", (torch.int32,), 1)
    _check_buf(col, "col", (torch.uint16, torch.int32), 1)
    _check_buf(values, "values", _VALUE_DTYPES, 1)
    if col.shape[0] != values.shape[0]:
        raise ModelError(f"CSR col ({col.shape[0]}) and values ({values.shape[0]}) differ in length")
    return row_ptr.shape[0] - 1


def _bitmap_dims(bitmap: Tensor, row_offsets: Tensor, values: Tensor, cols: int) -> int:
    _check_buf(bitmap, "bitmap", (torch.uint8,), 2)
    _check_buf(row_offsets, "row_offsets", (torch.int64,), 1)
    _check_buf(values, "values", _VALUE_DTYPES, 1)
    if bitmap.shape[1] != (cols + 7) // 8 or row_offsets.shape[0] != bitmap.shape[0] + 1:
        raise ModelError(
            f"bitmap {tuple(bitmap.shape)} / row_offsets {tuple(row_offsets.shape)} do not fit {cols} input features"
        )
    return bitmap.shape[0]


def _nm_dims(values: Tensor, indices: Tensor, n: int, m: int, cols: int) -> int:
    _check_buf(values, "values", _VALUE_DTYPES, 2)
    _check_buf(indices, "indices", (torch.uint8,), 2)
    if not 0 < n < m <= 256 or cols % m:
        raise ModelError(f"N:M weight needs 0 < n < m <= 256 and in_features divisible by m; got {n}:{m} with {cols} inputs")
    bits = max(1, (m - 1).bit_length())
    per_row = cols // m * n
    if tuple(values.shape[1:]) != (per_row,) or tuple(indices.shape) != (values.shape[0], (per_row * bits + 7) // 8):
        raise ModelError(
            f"{n}:{m} buffers values {tuple(values.shape)} / indices {tuple(indices.shape)} do not fit {cols} input features"
        )
    return values.shape[0]


def _linear_out(x: Tensor, out: int, bias: Optional[Tensor], fake: bool = False) -> Tensor:
    """Checks x and bias against a weight with ``out`` rows; the (B, out) output to fill (or fake)."""
    _check_act(x, "x", x.shape[-1], "input features")
    _check_bias(bias, out)
    return x.new_empty(x.shape[0], out) if fake else torch.empty(x.shape[0], out, dtype=torch.float32)


def _t_out(dy: Tensor, out: int, in_features: int, fake: bool = False) -> Tensor:
    """Checks dy against a weight with ``out`` rows; the (B, in) dx to fill (or fake)."""
    _check_act(dy, "dy", out, "output features")
    return dy.new_empty(dy.shape[0], in_features) if fake else torch.empty(dy.shape[0], in_features, dtype=torch.float32)


def _np(t: Optional[Tensor]):
    """Zero-copy numpy view for the native call (bf16 as its raw uint16 bits); ~3x cheaper per
    tensor than handing torch tensors to nanobind through DLPack."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _csr_impl(x, row_ptr, col, values, bias):
    y = _linear_out(x, _csr_dims(row_ptr, col, values), bias)
    native().csr_linear(_np(x), _np(row_ptr), _np(col), _np(values), _np(bias), y.numpy())
    return y


def _bitmap_impl(x, bitmap, row_offsets, values, bias):
    y = _linear_out(x, _bitmap_dims(bitmap, row_offsets, values, x.shape[-1]), bias)
    native().bitmap_linear(_np(x), _np(bitmap), _np(row_offsets), _np(values), _np(bias), y.numpy())
    return y


def _nm_impl(x, values, indices, n, m, bias):
    y = _linear_out(x, _nm_dims(values, indices, n, m, x.shape[-1]), bias)
    native().nm_linear(_np(x), _np(values), _np(indices), n, m, _np(bias), y.numpy())
    return y


# ---- CSR ---------------------------------------------------------------------------------------


@torch.library.custom_op("sparseforge::csr_linear", mutates_args=())
def csr_linear(x: Tensor, row_ptr: Tensor, col: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y (B, out) = x (B, in) @ W^T + bias for a CSR weight (see :mod:`sparseforge.formats.csr`)."""
    return _csr_impl(x, row_ptr, col, values, bias)


@csr_linear.register_fake
def _(x, row_ptr, col, values, bias):
    return _linear_out(x, _csr_dims(row_ptr, col, values), bias, fake=True)


@torch.library.custom_op("sparseforge::csr_linear_t", mutates_args=())
def csr_linear_t(dy: Tensor, row_ptr: Tensor, col: Tensor, values: Tensor, in_features: int) -> Tensor:
    """dx (B, in) = dy (B, out) @ W for a CSR weight."""
    dx = _t_out(dy, _csr_dims(row_ptr, col, values), in_features)
    native().csr_linear_t(_np(dy), _np(row_ptr), _np(col), _np(values), dx.numpy())
    return dx


@csr_linear_t.register_fake
def _(dy, row_ptr, col, values, in_features):
    return _t_out(dy, _csr_dims(row_ptr, col, values), in_features, fake=True)


# ---- bitmap ------------------------------------------------------------------------------------


@torch.library.custom_op("sparseforge::bitmap_linear", mutates_args=())
def bitmap_linear(x: Tensor, bitmap: Tensor, row_offsets: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y (B, out) = x (B, in) @ W^T + bias for a bitmap weight (see :mod:`sparseforge.formats.bitmap`)."""
    return _bitmap_impl(x, bitmap, row_offsets, values, bias)


@bitmap_linear.register_fake
def _(x, bitmap, row_offsets, values, bias):
    return _linear_out(x, _bitmap_dims(bitmap, row_offsets, values, x.shape[-1]), bias, fake=True)


@torch.library.custom_op("sparseforge::bitmap_linear_t", mutates_args=())
def bitmap_linear_t(dy: Tensor, bitmap: Tensor, row_offsets: Tensor, values: Tensor, in_features: int) -> Tensor:
    """dx (B, in) = dy (B, out) @ W for a bitmap weight."""
    dx = _t_out(dy, _bitmap_dims(bitmap, row_offsets, values, in_features), in_features)
    native().bitmap_linear_t(_np(dy), _np(bitmap), _np(row_offsets), _np(values), dx.numpy())
    return dx


@bitmap_linear_t.register_fake
def _(dy, bitmap, row_offsets, values, in_features):
    return _t_out(dy, _bitmap_dims(bitmap, row_offsets, values, in_features), in_features, fake=True)


# ---- N:M ---------------------------------------------------------------------------------------


@torch.library.custom_op("sparseforge::nm_linear", mutates_args=())
def nm_linear(x: Tensor, values: Tensor, indices: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    """y (B, out) = x (B, in) @ W^T + bias for an N:M weight (see :mod:`sparseforge.formats.nm`)."""
    return _nm_impl(x, values, indices, n, m, bias)


@nm_linear.register_fake
def _(x, values, indices, n, m, bias):
    return _linear_out(x, _nm_dims(values, indices, n, m, x.shape[-1]), bias, fake=True)


@torch.library.custom_op("sparseforge::nm_linear_t", mutates_args=())
def nm_linear_t(dy: Tensor, values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """dx (B, in) = dy (B, out) @ W for an N:M weight."""
    dx = _t_out(dy, _nm_dims(values, indices, n, m, in_features), in_features)
    native().nm_linear_t(_np(dy), _np(values), _np(indices), n, m, dx.numpy())
    return dx


@nm_linear_t.register_fake
def _(dy, values, indices, n, m, in_features):
    return _t_out(dy, _nm_dims(values, indices, n, m, in_features), in_features, fake=True)


# ---- constant fan-in ---------------------------------------------------------------------------


def _fanin_dims(values: Tensor, indices: Tensor, cols: int) -> int:
    _check_buf(values, "values", _VALUE_DTYPES, 2)
    _check_buf(indices, "indices", (torch.uint16, torch.int32), 2)
    if indices.shape != values.shape or values.shape[1] > cols:
        raise ModelError(f"fan-in values {tuple(values.shape)} / indices {tuple(indices.shape)} do not fit {cols} input features")
    return values.shape[0]


def _fanin_impl(x, values, indices, bias):
    y = _linear_out(x, _fanin_dims(values, indices, x.shape[-1]), bias)
    native().fanin_linear(_np(x), _np(values), _np(indices), _np(bias), y.numpy())
    return y


@torch.library.custom_op("sparseforge::fanin_linear", mutates_args=())
def fanin_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y (B, out) = x (B, in) @ W^T + bias for a constant fan-in weight (:mod:`sparseforge.formats.fanin`)."""
    return _fanin_impl(x, values, indices, bias)


@fanin_linear.register_fake
def _(x, values, indices, bias):
    return _linear_out(x, _fanin_dims(values, indices, x.shape[-1]), bias, fake=True)


@torch.library.custom_op("sparseforge::fanin_linear_t", mutates_args=())
def fanin_linear_t(dy: Tensor, values: Tensor, indices: Tensor, in_features: int) -> Tensor:
    """dx (B, in) = dy (B, out) @ W for a constant fan-in weight."""
    dx = _t_out(dy, _fanin_dims(values, indices, in_features), in_features)
    native().fanin_linear_t(_np(dy), _np(values), _np(indices), dx.numpy())
    return dx


@fanin_linear_t.register_fake
def _(dy, values, indices, in_features):
    return _t_out(dy, _fanin_dims(values, indices, in_features), in_features, fake=True)


# ---- block-sparse rows (BSR) -------------------------------------------------------------------


def _bsr_dims(block_row_ptr: Tensor, block_col: Tensor, values: Tensor, cols: int) -> int:
    _check_buf(block_row_ptr, "block_row_ptr", (torch.int32,), 1)
    _check_buf(block_col, "block_col", (torch.uint16, torch.int32), 1)
    _check_buf(values, "values", _VALUE_DTYPES, 3)
    h, w = values.shape[1], values.shape[2]
    if block_col.shape[0] != values.shape[0] or min(h, w) < 1 or cols % w:
        raise ModelError(
            f"BSR block_col {tuple(block_col.shape)} / values {tuple(values.shape)} do not fit {cols} input features"
        )
    return (block_row_ptr.shape[0] - 1) * h


def _bsr_impl(x, block_row_ptr, block_col, values, bias):
    y = _linear_out(x, _bsr_dims(block_row_ptr, block_col, values, x.shape[-1]), bias)
    native().bsr_linear(_np(x), _np(block_row_ptr), _np(block_col), _np(values), _np(bias), y.numpy())
    return y


@torch.library.custom_op("sparseforge::bsr_linear", mutates_args=())
def bsr_linear(x: Tensor, block_row_ptr: Tensor, block_col: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y (B, out) = x (B, in) @ W^T + bias for a BSR weight (:mod:`sparseforge.formats.bsr`)."""
    return _bsr_impl(x, block_row_ptr, block_col, values, bias)


@bsr_linear.register_fake
def _(x, block_row_ptr, block_col, values, bias):
    return _linear_out(x, _bsr_dims(block_row_ptr, block_col, values, x.shape[-1]), bias, fake=True)


@torch.library.custom_op("sparseforge::bsr_linear_t", mutates_args=())
def bsr_linear_t(dy: Tensor, block_row_ptr: Tensor, block_col: Tensor, values: Tensor, in_features: int) -> Tensor:
    """dx (B, in) = dy (B, out) @ W for a BSR weight."""
    dx = _t_out(dy, _bsr_dims(block_row_ptr, block_col, values, in_features), in_features)
    native().bsr_linear_t(_np(dy), _np(block_row_ptr), _np(block_col), _np(values), dx.numpy())
    return dx


@bsr_linear_t.register_fake
def _(dy, block_row_ptr, block_col, values, in_features):
    return _t_out(dy, _bsr_dims(block_row_ptr, block_col, values, in_features), in_features, fake=True)


# ---- dW restricted to the mask ----------------------------------------------------------------


def _dw_out(x: Tensor, dy: Tensor, values: Tensor, cols: int, rows: int) -> Tensor:
    _check_act(x, "x", cols, "input features")
    _check_act(dy, "dy", rows, "output features")
    if x.shape[0] != dy.shape[0]:
        raise DataError(f"x ({x.shape[0]} rows) and dy ({dy.shape[0]} rows) must have the same batch")
    return torch.empty(values.shape, dtype=torch.float32)


@torch.library.custom_op("sparseforge::csr_linear_dw", mutates_args=())
def csr_linear_dw(x: Tensor, dy: Tensor, row_ptr: Tensor, col: Tensor, values: Tensor) -> Tensor:
    """dW at the mask for a CSR weight: float32 (nnz,), ``dw[q] = sum_b dy[b, r_q] * x[b, c_q]``."""
    dw = _dw_out(x, dy, values, x.shape[-1], _csr_dims(row_ptr, col, values))
    native().csr_sddmm(_np(x), _np(dy), _np(row_ptr), _np(col), _np(values), dw.numpy())
    return dw


@csr_linear_dw.register_fake
def _(x, dy, row_ptr, col, values):
    _csr_dims(row_ptr, col, values)
    return values.new_empty(values.shape, dtype=torch.float32)


@torch.library.custom_op("sparseforge::bitmap_linear_dw", mutates_args=())
def bitmap_linear_dw(x: Tensor, dy: Tensor, bitmap: Tensor, row_offsets: Tensor, values: Tensor) -> Tensor:
    """dW at the mask for a bitmap weight: float32 (nnz,) in the order of ``values``."""
    dw = _dw_out(x, dy, values, x.shape[-1], _bitmap_dims(bitmap, row_offsets, values, x.shape[-1]))
    native().bitmap_sddmm(_np(x), _np(dy), _np(bitmap), _np(row_offsets), _np(values), dw.numpy())
    return dw


@bitmap_linear_dw.register_fake
def _(x, dy, bitmap, row_offsets, values):
    _bitmap_dims(bitmap, row_offsets, values, x.shape[-1])
    return values.new_empty(values.shape, dtype=torch.float32)


@torch.library.custom_op("sparseforge::nm_linear_dw", mutates_args=())
def nm_linear_dw(x: Tensor, dy: Tensor, values: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    """dW at the mask for an N:M weight: float32 shaped like ``values`` (padding zeros included)."""
    dw = _dw_out(x, dy, values, x.shape[-1], _nm_dims(values, indices, n, m, x.shape[-1]))
    native().nm_sddmm(_np(x), _np(dy), _np(values), _np(indices), n, m, dw.numpy())
    return dw


@nm_linear_dw.register_fake
def _(x, dy, values, indices, n, m):
    _nm_dims(values, indices, n, m, x.shape[-1])
    return values.new_empty(values.shape, dtype=torch.float32)


@torch.library.custom_op("sparseforge::fanin_linear_dw", mutates_args=())
def fanin_linear_dw(x: Tensor, dy: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """dW at the mask for a constant fan-in weight: float32 (out, k)."""
    dw = _dw_out(x, dy, values, x.shape[-1], _fanin_dims(values, indices, x.shape[-1]))
    native().fanin_sddmm(_np(x), _np(dy), _np(values), _np(indices), dw.numpy())
    return dw


@fanin_linear_dw.register_fake
def _(x, dy, values, indices):
    _fanin_dims(values, indices, x.shape[-1])
    return values.new_empty(values.shape, dtype=torch.float32)


@torch.library.custom_op("sparseforge::bsr_linear_dw", mutates_args=())
def bsr_linear_dw(x: Tensor, dy: Tensor, block_row_ptr: Tensor, block_col: Tensor, values: Tensor) -> Tensor:
    """dW at the mask for a BSR weight: float32 (nblocks, h, w), whole stored blocks."""
    dw = _dw_out(x, dy, values, x.shape[-1], _bsr_dims(block_row_ptr, block_col, values, x.shape[-1]))
    native().bsr_sddmm(_np(x), _np(dy), _np(block_row_ptr), _np(block_col), _np(values), dw.numpy())
    return dw


@bsr_linear_dw.register_fake
def _(x, dy, block_row_ptr, block_col, values):
    _bsr_dims(block_row_ptr, block_col, values, x.shape[-1])
    return values.new_empty(values.shape, dtype=torch.float32)


# ---- autograd ----------------------------------------------------------------------------------


def _setup(ctx, inputs, output, *, values_at: int, weight_at: slice, statics: tuple = ()):
    x, bias = inputs[0], inputs[-1]
    # x is kept only when the stored values need their gradient (dW at the mask reads it)
    ctx.save_for_backward(x if inputs[values_at].requires_grad else None, *inputs[weight_at])
    ctx.in_features = x.shape[1]
    ctx.has_bias = bias is not None
    ctx.values_at = values_at
    ctx.statics = tuple(inputs[i] for i in statics)


def _grads(ctx, dy: Tensor, transposed, sddmm) -> tuple:
    x, *weight = ctx.saved_tensors
    dy = dy.contiguous()
    dx = transposed(dy, *weight, *ctx.statics, ctx.in_features) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[ctx.values_at]:
        values = weight[ctx.values_at - 1]
        dw = sddmm(x, dy, *weight, *ctx.statics).to(values.dtype)  # float32 accumulate, values' dtype
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[-1] else None
    return dx, dw, db


def _csr_backward(ctx, dy):
    dx, dw, db = _grads(ctx, dy, csr_linear_t, csr_linear_dw)
    return dx, None, None, dw, db


def _bitmap_backward(ctx, dy):
    dx, dw, db = _grads(ctx, dy, bitmap_linear_t, bitmap_linear_dw)
    return dx, None, None, dw, db


def _nm_backward(ctx, dy):
    dx, dw, db = _grads(ctx, dy, nm_linear_t, nm_linear_dw)
    return dx, dw, None, None, None, db


def _fanin_backward(ctx, dy):
    dx, dw, db = _grads(ctx, dy, fanin_linear_t, fanin_linear_dw)
    return dx, dw, None, db


def _bsr_backward(ctx, dy):
    dx, dw, db = _grads(ctx, dy, bsr_linear_t, bsr_linear_dw)
    return dx, None, None, dw, db


csr_linear.register_autograd(
    _csr_backward, setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, values_at=3, weight_at=slice(1, 4))
)
bitmap_linear.register_autograd(
    _bitmap_backward,
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, values_at=3, weight_at=slice(1, 4)),
)
nm_linear.register_autograd(
    _nm_backward,
    setup_context=lambda ctx, inputs, output: _setup(
        ctx, inputs, output, values_at=1, weight_at=slice(1, 3), statics=(3, 4)
    ),
)
fanin_linear.register_autograd(
    _fanin_backward,
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, values_at=1, weight_at=slice(1, 3)),
)
bsr_linear.register_autograd(
    _bsr_backward,
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, values_at=3, weight_at=slice(1, 4)),
)


# ---- convenience -------------------------------------------------------------------------------


def _dispatch(weight) -> tuple:
    """(implementation, registered op, weight arguments) for a format object."""
    from sparseforge.formats import BitmapWeight, BSRWeight, FanInWeight, NMWeight
    from sparseforge.formats.csr import CSRWeight

    if isinstance(weight, CSRWeight):
        return _csr_impl, csr_linear, (weight.row_ptr, weight.col, weight.values)
    if isinstance(weight, BitmapWeight):
        return _bitmap_impl, bitmap_linear, (weight.bitmap, weight.row_offsets, weight.values)
    if isinstance(weight, NMWeight):
        return _nm_impl, nm_linear, (weight.values, weight.indices, weight.pattern.n, weight.pattern.m)
    if isinstance(weight, FanInWeight):
        return _fanin_impl, fanin_linear, (weight.values, weight.indices)
    if isinstance(weight, BSRWeight):
        return _bsr_impl, bsr_linear, (weight.block_row_ptr, weight.block_col, weight.values)
    raise ModelError(
        f"no sparse kernel for weight type {type(weight).__name__}; use CSRWeight, BitmapWeight, NMWeight, "
        "FanInWeight or BSRWeight"
    )


def linear(x: Tensor, weight, bias: Optional[Tensor] = None) -> Tensor:
    """``x (..., in) @ weight^T + bias`` for a CSR, bitmap, N:M, fan-in or BSR weight.

    Leading dimensions of ``x`` are flattened into the batch and restored on the output.
    """
    impl, op, wargs = _dispatch(weight)
    rows, cols = weight.shape
    if x.dim() < 1 or x.shape[-1] != cols:
        raise DataError(f"x must have shape (..., {cols}) to match a {rows}x{cols} weight, got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise DataError("x must be contiguous; call .contiguous() first")
    x2 = x.reshape(-1, cols)  # (B, in)
    # Eager inference calls the ops' implementation directly: same code, without the ~20 us of
    # custom-op dispatch per call (that matters for batch-1 decoding). Anything autograd or
    # torch.compile must see goes through the registered op.
    direct = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.values.requires_grad or (bias is not None and bias.requires_grad))
    )
    y = (impl if direct else op)(x2, *wargs, bias)
    return y.reshape(*x.shape[:-1], rows)
