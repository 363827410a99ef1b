"""``sparseforge::column_sparse_linear``: activation sparsity times weight sparsity in one product.

``y (B, out) = mask(x) (B, in) @ W^T + bias`` where ``mask`` zeroes the input channels with
``|x| <= threshold`` (one threshold, or one per input channel) and ``W`` is a
:class:`~sparseforge.formats.colbitmap.ColumnBitmapWeight` (per input channel a bitmap plus packed
kept values, float32, bfloat16 or int8 with one float32 scale per output row). The native kernel (``csrc/column_sparse.h``) reads only the
active channels' bitmaps and kept values, so a decode step reads about
``(1 - s_act) * ((1 - s_w) * value_size + 1/8)`` bytes per weight (TEAL, Liu et al. 2024,
arXiv:2408.14690, for the skipped channels; the format for the pruned weights). Many rows (prefill)
decode the same stored layout panel by panel into L2 and run a GEMM over it: no second copy.

int8 values (``values`` int8 plus ``scales`` float32 ``(out,)``, the grid of
:mod:`sparseforge.formats.quantized`): the kernel widens ``q`` to float32 in registers, sums
``x_i * q`` per output in float32 and writes ``scales[j] * sum + bias[j]`` at the end of each output
tile (the decoded panels of the multi-row path hold ``q`` too); bf16 compute does not take them.

bf16 compute (``compute_dtype=torch.bfloat16``, op ``sparseforge::column_sparse_linear_bf16``):
from :data:`~sparseforge.ops.bf16_compute.BF16_MIN_BATCH` rows on, the channels are masked on the
float32 ``x`` as above, then the kept values and the weights are rounded to bf16 and multiplied with
float32 accumulation (the arithmetic of torch's bf16 ``F.linear``) on the bf16 path of this machine
(AMX TDPBF16PS, AVX512_BF16 ``vdpbf16ps`` or scalar; ``SPARSEFORGE_BF16_PATH`` forces one, see
:func:`sparseforge.kernels.bf16_path`). Column blocks are decoded into bf16 VNNI panels
(``vpexpandw``), and a channel inactive in every row of a 64-row block is never read
(``csrc/column_sparse_bf16.h``). Fewer rows run the float32 kernel on the stored values.

Registered with a fake impl (shapes for ``torch.compile``) and autograd for ``x`` and ``bias`` (the
straight-through product of the kept channels, ``dx = (dy @ W) * kept``); the stored weights and
the threshold get no gradient. The registered op checks the weight's buffers on every call (one
popcount per 64 weights); :func:`kernel_args` checks them once for a caller that reuses them.
:func:`column_sparse_reference` is the same function in plain torch.

Example:
    >>> import torch
    >>> from sparseforge.formats.colbitmap import ColumnBitmapWeight
    >>> from sparseforge.ops.column_sparse import column_sparse_linear
    >>> w = ColumnBitmapWeight.from_dense(torch.tensor([[1., 0., 2.], [0., 3., 4.]]))   # (out=2, in=3)
    >>> x = torch.tensor([[0.1, 1.0, -2.0]])
    >>> column_sparse_linear(x, w, torch.tensor([0.5])).tolist()   # channel 0 skipped
    [[-4.0, -5.0]]
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from sparseforge.errors import ConfigError, DataError, ModelError, SparseforgeError
from sparseforge.formats.colbitmap import ColumnBitmapWeight
from sparseforge.kernels import native
from sparseforge.ops.bf16_compute import BF16_MIN_BATCH
from sparseforge.ops.sparse_input import sparse_input_masked

__all__ = ["column_sparse_linear", "column_sparse_op", "column_sparse_bf16_op", "column_sparse_reference",
           "column_sparse_bf16_reference", "kernel_args", "bind_group", "dense_from_buffers", "uses_bf16_product", "ALGOS",
           "COMPUTE_DTYPES"]

ALGOS = ("auto", "gemv", "gemm")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def check_compute_dtype(compute_dtype: torch.dtype) -> None:
    """A :class:`ConfigError` unless ``compute_dtype`` is one of :data:`COMPUTE_DTYPES`."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype must be torch.float32 or torch.bfloat16, got {compute_dtype}")


def uses_bf16_product(rows: int, compute_dtype: torch.dtype, algo: str = "auto") -> bool:
    """Whether a call of ``rows`` rows runs the bf16 product (module doc): bf16 compute and at least
    ``BF16_MIN_BATCH`` rows (``algo="gemm"``: any rows; ``"gemv"``: never)."""
    if compute_dtype != torch.bfloat16 or algo == "gemv":
        return False
    return algo == "gemm" or rows >= BF16_MIN_BATCH


def _np(t: Tensor):
    t = t.detach()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _check(x: Tensor, bitmap: Tensor, thresholds: Tensor, bias: Optional[Tensor], out_features: int,
           values: Optional[Tensor] = None, scales: Optional[Tensor] = None) -> None:
    n_in = bitmap.shape[0]
    if values is not None and (values.dtype == torch.int8) != (scales is not None):
        raise ModelError(f"int8 values need float32 scales of shape ({out_features},), and only int8 values take "
                         f"scales; got {values.dtype} values and scales={'None' if scales is None else tuple(scales.shape)}")
    if scales is not None and (scales.dtype != torch.float32 or tuple(scales.shape) != (out_features,)):
        raise ModelError(f"scales must be float32 of shape ({out_features},), one per output row, got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != n_in:
        raise DataError(f"x must be a float32 CPU tensor of shape (batch, {n_in}), got {x.dtype} {tuple(x.shape)} on {x.device}")
    if thresholds.dtype != torch.float32 or thresholds.dim() != 1 or thresholds.shape[0] not in (1, n_in):
        raise ModelError(f"thresholds must be float32 of shape (1,) or ({n_in},), got {thresholds.dtype} "
                         f"{tuple(thresholds.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (out_features,)):
        raise ModelError(f"bias must be float32 of shape ({out_features},), got {bias.dtype} {tuple(bias.shape)}")


def _native_call(fn, *args) -> None:
    try:
        fn(*args)
    except ValueError as exc:  # native checks (a negative or NaN threshold, a shape); ModelError passes through
        if isinstance(exc, SparseforgeError):
            raise
        raise DataError(str(exc)) from exc


def kernel_args(bitmap: Tensor, block_ptr: Tensor, values: Tensor, out_features: int,
                scales: Optional[Tensor] = None) -> tuple:
    """``(native kernel, bitmap, block_ptr, values)`` views of a column-sparse weight's buffers,
    checked once, for a caller that runs many eager calls on the same tensors (the views share their
    memory): ``kernel(x.numpy(), *views, thresholds.numpy(), bias.numpy() or None, y.numpy())`` with
    ``x`` float32 ``(B, in)`` and ``y`` ``(B, out)``; int8 values: the kernel has their ``scales``
    bound already."""
    views = (_np(bitmap), _np(block_ptr), _np(values))
    s = None if scales is None else _np(scales)
    _native_call(native().column_sparse_check, *views, out_features, s)
    kernel = native().column_sparse_linear
    if s is None:
        return (kernel, *views)
    return (functools.partial(kernel, scales=s), *views)


def bind_group(members: list[tuple]) -> object:
    """Sibling column-sparse products of one input bound as one native call: ``members`` are
    ``(bitmap, block_ptr, values, thresholds, bias or None, out_features, scales or None)`` tensors
    (float32 thresholds and bias), each weight checked once. The returned ``group(x.numpy(),
    y.numpy())`` writes every member's product of ``x`` (float32 ``(B, in)``) into its own columns of
    ``y`` (float32 ``(B, sum of out_features)``), in member order; at batch 1 all members' tasks run
    as one thread-pool job (``csrc/column_sparse.h``: ``column_sparse_linear_group``), each member's
    output bitwise that of its own :func:`kernel_args` call. The group holds the tensors' memory:
    bind again after replacing a tensor (an in-place threshold change is seen)."""
    specs = []
    for bitmap, block_ptr, values, thresholds, bias, out_features, scales in members:
        specs.append((_np(bitmap), _np(block_ptr), _np(values), _np(thresholds), None if bias is None else _np(bias),
                      int(out_features), None if scales is None else _np(scales)))
    try:
        return native().ColumnSparseGroup(specs)
    except ValueError as exc:
        if isinstance(exc, SparseforgeError):
            raise
        raise ModelError(f"cannot bind the column-sparse group: {exc}") from exc


def _forward(x: Tensor, bitmap: Tensor, block_ptr: Tensor, values: Tensor, thresholds: Tensor, bias: Optional[Tensor],
             out_features: int, algo: str = "auto", bf16: bool = False, scales: Optional[Tensor] = None) -> Tensor:
    _check(x, bitmap, thresholds, bias, out_features, values, scales)
    if bf16 and scales is not None:
        raise ConfigError("bf16 compute takes float32 or bfloat16 column values, not int8; use compute_dtype=torch.float32")
    views = (_np(bitmap), _np(block_ptr), _np(values))
    s = None if scales is None else _np(scales.contiguous())
    _native_call(native().column_sparse_check, *views, out_features, s)
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)  # (B, out)
    b = None if bias is None else _np(bias.contiguous())
    args = (_np(x.contiguous()), *views, _np(thresholds.contiguous()), b, y.numpy())
    if bf16:
        _native_call(native().column_sparse_linear_bf16, *args, "")
    else:
        _native_call(native().column_sparse_linear, *args, "", algo, True, s)
    return y


@torch.library.custom_op("sparseforge::column_sparse_linear", mutates_args=())
def _column_sparse_op(x: Tensor, bitmap: Tensor, block_ptr: Tensor, values: Tensor, thresholds: Tensor,
                      bias: Optional[Tensor], out_features: int, scales: Optional[Tensor] = None) -> Tensor:
    return _forward(x, bitmap, block_ptr, values, thresholds, bias, out_features, scales=scales)


@_column_sparse_op.register_fake
def _(x, bitmap, block_ptr, values, thresholds, bias, out_features, scales=None):
    _check(x, bitmap, thresholds, bias, out_features, values, scales)
    return x.new_empty(x.shape[0], out_features)


def dense_from_buffers(bitmap: Tensor, values: Tensor, out_features: int, scales: Optional[Tensor] = None) -> Tensor:
    """The float32 ``(out, in)`` weight of the buffers (pruned entries 0; int8: ``scales[j] * q``), in plain torch."""
    n_in = bitmap.shape[0]
    shifts = torch.arange(64, dtype=torch.int64)
    bits = ((bitmap.unsqueeze(-1) >> shifts) & 1).bool().reshape(n_in, -1)[:, :out_features]  # (in, out)
    w_t = torch.zeros(n_in, out_features, dtype=torch.float32)
    w_t[bits] = values.float()
    if scales is not None:
        w_t = w_t * scales.float()  # (in, out) * (out,)
    return w_t.t()


def _setup(ctx, inputs, output):
    x, bitmap, block_ptr, values, thresholds, bias, out_features = inputs[:7]
    scales = inputs[7] if len(inputs) > 7 else None
    ctx.save_for_backward(x, bitmap, values, thresholds, scales)
    ctx.out_features = out_features
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, bitmap, values, thresholds, scales = ctx.saved_tensors
    dx = db = None
    if ctx.needs_input_grad[0]:
        kept = ~(x.abs() <= thresholds)  # (B, in)
        dx = (dy @ dense_from_buffers(bitmap, values, ctx.out_features, scales)) * kept  # (B, in)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        db = dy.sum(0)
    return (dx, None, None, None, None, db, None) + (None,) * (len(ctx.needs_input_grad) - 7)


_column_sparse_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("sparseforge::column_sparse_linear_bf16", mutates_args=())
def _column_sparse_bf16_op(x: Tensor, bitmap: Tensor, block_ptr: Tensor, values: Tensor, thresholds: Tensor,
                           bias: Optional[Tensor], out_features: int) -> Tensor:
    return _forward(x, bitmap, block_ptr, values, thresholds, bias, out_features, bf16=True)


@_column_sparse_bf16_op.register_fake
def _(x, bitmap, block_ptr, values, thresholds, bias, out_features):
    _check(x, bitmap, thresholds, bias, out_features)
    return x.new_empty(x.shape[0], out_features)


_column_sparse_bf16_op.register_autograd(_backward, setup_context=_setup)


def column_sparse_op(x: Tensor, bitmap: Tensor, block_ptr: Tensor, values: Tensor, thresholds: Tensor,
                     bias: Optional[Tensor], out_features: int, scales: Optional[Tensor] = None) -> Tensor:
    """The registered op ``sparseforge::column_sparse_linear`` over a weight's buffers (what
    ``torch.compile`` and autograd see; a module holding the buffers calls this); ``scales`` float32
    ``(out,)`` with int8 ``values`` only."""
    return _column_sparse_op(x, bitmap, block_ptr, values, thresholds, bias, out_features, scales)


def column_sparse_bf16_op(x: Tensor, bitmap: Tensor, block_ptr: Tensor, values: Tensor, thresholds: Tensor,
                          bias: Optional[Tensor], out_features: int) -> Tensor:
    """The registered op ``sparseforge::column_sparse_linear_bf16`` (bf16 compute, module doc)."""
    return _column_sparse_bf16_op(x, bitmap, block_ptr, values, thresholds, bias, out_features)


def column_sparse_linear(x: Tensor, weight: ColumnBitmapWeight, thresholds: Tensor, bias: Optional[Tensor] = None, *,
                         algo: str = "auto", compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """``mask(x) (B, in) @ weight^T + bias`` by the native kernel (see the module doc).

    ``algo`` (eager calls; the registered op always uses ``"auto"``): ``"auto"`` runs the sparse
    GEMV per row while the rows' active channels together number at most ``in``, else the
    decoded-panel GEMM; ``"gemv"`` / ``"gemm"`` force one. ``compute_dtype=torch.bfloat16`` runs the
    bf16 product from ``BF16_MIN_BATCH`` rows on (``"gemm"``: at any batch), the float32 kernel below.
    """
    if not isinstance(weight, ColumnBitmapWeight):
        raise ModelError(f"column_sparse_linear needs a ColumnBitmapWeight, got {type(weight).__name__}")
    if algo not in ALGOS:
        raise DataError(f"algo must be one of {ALGOS}, got {algo!r}")
    check_compute_dtype(compute_dtype)
    bf16 = uses_bf16_product(x.shape[0], compute_dtype, algo)
    if weight.scales is not None and compute_dtype != torch.float32:
        raise ConfigError("bf16 compute takes float32 or bfloat16 column values, not int8; use compute_dtype=torch.float32")
    args = (x, weight.bitmap, weight.block_ptr, weight.values, thresholds, bias, weight.shape[0])
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias))):
        return _column_sparse_bf16_op(*args) if bf16 else _column_sparse_op(*args, weight.scales)
    return _forward(*args, algo, bf16, weight.scales)


def column_sparse_reference(x: Tensor, weight: ColumnBitmapWeight, thresholds: Tensor,
                            bias: Optional[Tensor] = None) -> Tensor:
    """The same product in plain torch (float32): the dense baseline the kernel is tested against."""
    y = sparse_input_masked(x.float(), thresholds.float()) @ weight.to_dense().float().t()  # (B, out)
    return y if bias is None else y + bias.float()


def column_sparse_bf16_reference(x: Tensor, weight: ColumnBitmapWeight, thresholds: Tensor,
                                 bias: Optional[Tensor] = None) -> Tensor:
    """The bf16-compute product in plain torch: channels masked on the float32 ``x``, the kept values
    and the weights rounded to bf16, float32 products and sums."""
    xm = sparse_input_masked(x.float(), thresholds.float()).bfloat16().float()  # (B, in)
    y = xm @ weight.to_dense().bfloat16().float().t()  # (B, out)
    return y if bias is None else y + bias.float()
