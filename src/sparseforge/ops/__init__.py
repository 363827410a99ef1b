"""Torch custom ops over the native sparse kernels: ``y = x @ W^T + bias`` for every sparse format.

Layering (STYLE.md habit 5): ``csrc/`` torch-free C++ kernels -> ``sparseforge._native`` (nanobind,
raw buffers) -> this package (``torch.library.custom_op`` with fake impls and autograd, one module per
format, all defined by :func:`sparseforge.ops._define.define`) -> modules. Each op takes the format's
buffers as tensors, so it works in eager mode, under ``torch.compile`` (the fake impl gives shapes)
and in training:

* ``sparseforge::csr_linear(x, row_ptr, col, values, bias)``
* ``sparseforge::bitmap_linear(x, bitmap, row_offsets, values, bias)``
* ``sparseforge::nm_linear(x, values, indices, n, m, bias)``
* ``sparseforge::fanin_linear(x, values, indices, bias)``
* ``sparseforge::bsr_linear(x, block_row_ptr, block_col, values, bias)``
* ``sparseforge::{bitmap,nm,csr}_linear_bf16(x, W..., bias)``: bf16 compute (``x`` bfloat16, AMX /
  AVX512_BF16 panel product for batch >= 16; :func:`linear_bf16`, :mod:`sparseforge.ops.bf16_compute`)
* ``sparseforge::bitmap_i8_linear(x, bitmap, row_offsets, values, scales, bias, act="float")``,
  ``sparseforge::nm_i8_linear(x, values, indices, scales, n, m, bias, act="float")`` and
  ``sparseforge::csr_i8_linear(x, row_ptr, col, values, scales, bias)``: int8 values with float32 row
  scales (:mod:`sparseforge.ops.int8`; :func:`linear` picks them for a weight whose values are int8;
  ``act="int8"``, :func:`linear`'s ``activations="int8"``, quantizes ``x`` per row: inference only)
* ``sparseforge::dense_bf16_gemv(x, weight, bias)``: the dense bf16 GEMV for decode (``x`` and ``weight``
  bfloat16, float32 sums, bfloat16 out; :mod:`sparseforge.ops.dense_bf16`, forward only)
* ``sparseforge::moe_expert_ffn(x, experts, weights, w_up, w_down, w_gate, activation, parallel)``: the
  few-token MoE expert FFN (:mod:`sparseforge.ops.expert_ffn`, forward only)

``x`` is float32 ``(B, in)``, C-contiguous, on the CPU; ``values`` float32 or bfloat16; the output is
float32 ``(B, out)``. CSR buffers do not record ``in``, so ``csr_linear`` takes it from ``x``;
:func:`linear` checks ``x`` against the weight's shape for every format. NaN/inf propagate as in the
dense product with the pruned weights set to zero.

Autograd: ``dx = dy @ W`` runs the native transposed-product kernels (``sparseforge::*_linear_t``:
batch in SIMD lanes, compiled per ISA), ``dbias = dy.sum(0)``, and the gradient of the stored
values, dW restricted to the mask, runs the native SDDMM kernels (``sparseforge::*_linear_dw``:
``dw[q] = sum_b dy[b, r_q] * x[b, c_q]`` for each stored entry ``q`` at ``(r_q, c_q)``, float32
accumulate, in the layout of ``values``; cast to the values' dtype). So ``values.requires_grad_()``
trains the kept weights while the structure stays fixed.

Example:
    >>> import torch
    >>> from sparseforge.formats import BitmapWeight
    >>> from sparseforge.ops import linear
    >>> w = torch.tensor([[1., 0., 2.], [0., 0., -1.]])
    >>> linear(torch.ones(1, 3), BitmapWeight.from_dense(w)).tolist()
    [[3.0, -1.0]]
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from sparseforge.errors import ConfigError, DataError, ModelError
from sparseforge.formats import registry
from sparseforge.ops import bitmap, bsr, csr, fanin, int8, nm
from sparseforge.ops._define import check_act, check_bias, np_view
from sparseforge.ops.bitmap import bitmap_linear, bitmap_linear_dw, bitmap_linear_t
from sparseforge.ops.bsr import bsr_linear, bsr_linear_dw, bsr_linear_t
from sparseforge.ops.csr import csr_linear, csr_linear_dw, csr_linear_t
from sparseforge.ops.fanin import fanin_linear, fanin_linear_dw, fanin_linear_t
from sparseforge.ops.bf16_compute import linear_bf16
from sparseforge.ops.dense_bf16 import BoundDenseBf16, dense_bf16_gemv
from sparseforge.ops.nm import nm_linear, nm_linear_dw, nm_linear_t

__all__ = [
    "linear", "csr_linear", "bitmap_linear", "nm_linear", "csr_linear_t", "bitmap_linear_t", "nm_linear_t",
    "csr_linear_dw", "bitmap_linear_dw", "nm_linear_dw", "fanin_linear", "fanin_linear_t", "fanin_linear_dw",
    "bsr_linear", "bsr_linear_t", "bsr_linear_dw", "linear_bf16", "check_tile", "BoundLinear", "BoundDenseBf16",
    "dense_bf16_gemv",
]

KERNELS = {spec.fmt: spec for spec in (csr.OPS, bitmap.OPS, nm.OPS, fanin.OPS, bsr.OPS)}  # by kernel family
_TILED = ("csr", "bitmap", "nm", "bsr")  # kernel families with the batch-in-lanes path (col_tile / block_rows)
INT8_KERNELS = {"bitmap": int8.BITMAP_I8, "nm": int8.NM_I8, "csr": int8.CSR_I8}  # kernel family -> ops for int8 values


_BY_TYPE: dict[type, object] = {}  # format class -> FormatOps, valid for one registry generation
_BY_TYPE_GENERATION = [-1]


def _ops_for(weight):
    """The :class:`~sparseforge.ops._define.FormatOps` of a format object: its registered format's
    kernel family (:attr:`sparseforge.formats.registry.FormatSpec.kernel_family`), cached per class;
    the int8 ops of that family when the values are int8."""
    values = getattr(weight, "values", None)
    if isinstance(values, Tensor) and values.dtype == torch.int8:
        family = registry.spec_of(weight).kernel_family
        if family not in INT8_KERNELS:
            raise ModelError(f"no int8 kernels for format {registry.spec_of(weight).name!r}; int8 values run in "
                             f"{', '.join(INT8_KERNELS)}")
        return INT8_KERNELS[family]
    if _BY_TYPE_GENERATION[0] != registry.generation():
        _BY_TYPE.clear()
        _BY_TYPE_GENERATION[0] = registry.generation()
    spec = _BY_TYPE.get(type(weight))
    if spec is not None:
        return spec
    try:
        family = registry.spec_of(weight).kernel_family
    except ModelError as exc:
        raise ModelError(f"no sparse kernel for weight type {type(weight).__name__}: {exc}") from exc
    spec = KERNELS.get(family)
    if spec is None:
        raise ModelError(
            f"no sparse kernels for format {registry.spec_of(weight).name!r} (kernel family {family!r}); "
            f"the ops have {', '.join(KERNELS)}"
        )
    _BY_TYPE[type(weight)] = spec
    return spec


MAX_COL_TILE = 1024  # csrc/lanes.h kMaxColTile
MAX_BLOCK_ROWS = 256  # csrc/lanes.h kMaxBlockRows


def check_tile(col_tile: int, block_rows: int) -> None:
    """ConfigError unless ``col_tile`` is 0 (the rule) or a multiple of 64 in 64..1024 and
    ``block_rows`` is 0 (the rule) or in 1..256: the lanes kernels' tile (:func:`linear`)."""
    ok_col = isinstance(col_tile, int) and not isinstance(col_tile, bool) and (
        col_tile == 0 or (64 <= col_tile <= MAX_COL_TILE and col_tile % 64 == 0))
    if not ok_col:
        raise ConfigError(f"col_tile must be 0 (the rule) or a multiple of 64 in 64..{MAX_COL_TILE}, got {col_tile!r}")
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or not 0 <= block_rows <= MAX_BLOCK_ROWS:
        raise ConfigError(f"block_rows must be 0 (the rule) or in 1..{MAX_BLOCK_ROWS}, got {block_rows!r}")


def linear(x: Tensor, weight, bias: Optional[Tensor] = None, *, col_tile: int = 0, block_rows: int = 0,
           activations: str = "float") -> Tensor:
    """``x (..., in) @ weight^T + bias`` for a CSR, bitmap, N:M, fan-in or BSR weight (CSR, bitmap and
    N:M also with int8 values).

    Leading dimensions of ``x`` are flattened into the batch and restored on the output.
    ``col_tile`` / ``block_rows``: the column tile and rows per task of the batch-in-lanes kernels
    (batch >= 4; CSR, bitmap, N:M and BSR with float32 / bfloat16 values), 0 for the built-in rule
    (:mod:`sparseforge.measure.lanes_tile` measures them). They change the speed, never the result
    beyond float32 summation order; the autograd / ``torch.compile`` path runs the rule.
    ``activations="int8"`` (bitmap and N:M weights with int8 values; inference only) quantizes each row
    of ``x`` per call and sums in integers (:mod:`sparseforge.ops.int8`); ``"float"`` (default)
    multiplies float32 ``x``.
    """
    spec = _ops_for(weight)
    act = () if int8.check_activations(activations) == "float" else _int8_act(spec, weight, activations)
    tiled = bool(col_tile or block_rows)
    if tiled:
        check_tile(col_tile, block_rows)
    if tiled and (spec.fmt not in _TILED or weight.values.dtype == torch.int8):
        raise ConfigError(f"col_tile / block_rows apply to the {', '.join(_TILED)} kernels with float32 or bfloat16 "
                          f"values, not {spec.fmt} with {weight.values.dtype}; leave them 0")
    rows, cols = weight.shape
    if x.dim() < 1 or x.shape[-1] != cols:
        raise DataError(f"x must have shape (..., {cols}) to match a {rows}x{cols} weight, got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise DataError("x must be contiguous; call .contiguous() first")
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, cols)  # (B, in)
    # Anything autograd or torch.compile must see goes through the registered op (full checks).
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.values.requires_grad or (bias is not None and bias.requires_grad))
    if act and needs_grad:
        raise int8.inference_only(activations)
    if torch.compiler.is_compiling() or needs_grad:
        y = spec.linear(x2, *spec.unpack(weight), bias, *act)
    else:
        # Eager inference calls the native kernel directly: no custom-op dispatch (~20 us), and the
        # weight's buffers, validated once per format object, are not re-checked (batch-1 decoding).
        kernel, _, wargs = spec.kernel_args(weight)
        if x.dtype != torch.float32 or not x.is_cpu:
            check_act(x2, "x", cols, "input features")
        if bias is not None and not (
            bias.is_cpu and bias.dtype == torch.float32 and bias.shape == (rows,) and bias.is_contiguous()
        ):
            check_bias(bias, rows)  # raises, saying what is wrong
        y = torch.empty(x2.shape[0], rows, dtype=torch.float32)  # (B, out)
        if tiled:
            kernel(np_view(x2), *wargs, np_view(bias), y.numpy(), col_tile=col_tile, block_rows=block_rows)
        elif act:
            kernel(np_view(x2), *wargs, np_view(bias), y.numpy(), act=act[0])
        else:
            kernel(np_view(x2), *wargs, np_view(bias), y.numpy())
    return y if flat else y.reshape(*x.shape[:-1], rows)


def _int8_act(spec, weight, activations: str) -> tuple[str]:
    """The extra ``act`` argument of the int8 ops for ``activations`` (not ``"float"``); ConfigError for a
    weight without that mode."""
    if spec not in (int8.BITMAP_I8, int8.NM_I8):
        raise ConfigError(
            f"activations={activations!r} needs a bitmap or N:M weight with int8 values, got "
            f"{registry.spec_of(weight).name} with {weight.values.dtype} values; quantize it (dtype=torch.int8) "
            "in one of those formats, or keep activations='float'"
        )
    return (activations,)


class BoundLinear:
    """:func:`linear` with the weight's kernel, buffer views and checks bound once: ``bound(x)`` for float32
    ``x (B, in)``, C-contiguous, in eager inference (no autograd, no ``torch.compile``); ``activations``
    as in :func:`linear` (``"int8"``: int8 activations on a bitmap / N:M weight with int8 values).

    For a decode loop that calls the same layer every token: a call costs the native kernel, one view of
    ``x`` and an output allocation (or none with ``out=``), where :func:`linear` also resolves the format's
    ops and rebuilds or re-checks the weight's views. The result is bitwise that of :func:`linear`. The
    weight must not be replaced afterwards (bind again); in-place updates of its values are seen.

    Example:
        >>> import torch
        >>> from sparseforge.formats import BitmapWeight
        >>> bound = BoundLinear(BitmapWeight.from_dense(torch.tensor([[1., 0., 2.], [0., 0., -1.]])))
        >>> bound(torch.ones(1, 3)).tolist()
        [[3.0, -1.0]]
    """

    def __init__(self, weight, bias: Optional[Tensor] = None, activations: str = "float") -> None:
        spec = _ops_for(weight)
        act = () if int8.check_activations(activations) == "float" else _int8_act(spec, weight, activations)
        kernel, rows, wargs = spec.kernel_args(weight)
        if bias is not None:
            check_bias(bias, rows)
        self.weight, self.bias, self.activations = weight, bias, activations  # the views below share their memory
        self.out_features, self.in_features = rows, weight.shape[1]
        self._kernel = partial(kernel, act=act[0]) if act else kernel
        self._wargs, self._bias = wargs, np_view(bias)

    def __call__(self, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``x (B, in) @ W^T + bias`` as float32 ``(B, out)``, into ``out`` when given (float32, contiguous)."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.in_features or not x.is_contiguous() or not x.is_cpu:
            check_act(x, "x", self.in_features, "input features")
        if out is None:
            out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)  # (B, out)
        elif out.dtype != torch.float32 or out.shape != (x.shape[0], self.out_features) or not out.is_contiguous():
            raise DataError(f"out must be a contiguous float32 ({x.shape[0]}, {self.out_features}) tensor, got "
                            f"{out.dtype} {tuple(out.shape)}")
        self._kernel(np_view(x), *self._wargs, self._bias, out.numpy())
        return out

    def bind(self, x: Tensor, out: Tensor) -> Callable[[], None]:
        """A zero-argument call that computes ``x @ W^T + bias`` into ``out`` from the buffers' current contents: fixed
        float32 ``x (B, in)`` and ``out (B, out)`` of a decode loop, checked once here (one call). A call is the
        native kernel alone, without :meth:`__call__`'s checks, view and allocation."""
        self(x, out)
        return partial(self._kernel, np_view(x), *self._wargs, self._bias, out.numpy())
