"""bf16 compute for the batched sparse product: ``y = bf16(x) @ bf16(W)^T + bias``, float32 accumulation.

For batch >= :data:`BF16_MIN_BATCH` (prefill, batched serving) the native kernels decompress the
sparse weight, 32 rows x 512 columns at a time, into a dense bf16 panel kept in L1 and multiply it
with the activations (converted to bf16 at the layer edge) on the best path of this machine:

* ``amx``: AMX-BF16 tiles (TDPBF16PS), where the CPU and OS have them (Sapphire Rapids and later);
* ``avx512_bf16``: AVX512_BF16 ``vdpbf16ps`` (Cooper Lake, Zen 4 and later);
* ``scalar``: bf16 widened to float32 in plain C++, correct on any CPU but slow.

``SPARSEFORGE_BF16_PATH`` forces a path (:func:`sparseforge.kernels.bf16_path`). Formats: bitmap,
N:M and CSR, with float32 or bfloat16 values (float32 values are rounded to bf16, nearest even).
Layouts and dispatch rules: ``docs/kernels.md`` ("bf16 compute"). This is the same arithmetic as
torch's bf16 ``F.linear`` (bf16 operands, float32 accumulation), so results agree with
``F.linear(x.bfloat16(), w.bfloat16())`` to float32 summation order; subnormal bf16 inputs count as
zero on the AMX and ``vdpbf16ps`` paths.

Ops: ``sparseforge::bitmap_linear_bf16(x, bitmap, row_offsets, values, bias)``,
``sparseforge::nm_linear_bf16(x, values, indices, n, m, bias)``,
``sparseforge::csr_linear_bf16(x, row_ptr, col, values, bias)``: ``x`` bfloat16 ``(B, in)``, output
float32 ``(B, out)``; autograd through the float32 transposed and SDDMM ops of the format.

Example:
    >>> import torch
    >>> from sparseforge.formats import BitmapWeight
    >>> from sparseforge.ops import linear_bf16
    >>> w = torch.tensor([[1., 0., 2.], [0., 0., -1.]])
    >>> linear_bf16(torch.ones(16, 3), BitmapWeight.from_dense(w))[0].tolist()
    [3.0, -1.0]
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from sparseforge.errors import ConfigError, DataError
from sparseforge.formats import registry
from sparseforge.kernels import bf16_path, native
from sparseforge.ops import bitmap, csr, nm
from sparseforge.ops._define import check_bias, np_view

__all__ = ["linear_bf16", "bf16_formats", "supports_bf16", "BF16_MIN_BATCH"]

METHODS = ("panel", "skip")  # see linear_bf16 and sparseforge.measure.bf16_method
BF16_MIN_BATCH = 16  # SparseLinear(compute_dtype=torch.bfloat16) uses this product from this batch on

_log = logging.getLogger(__name__)

# kernel family -> (format ops, schema of the weight arguments, position of `values` among them)
_FAMILIES = {
    "bitmap": (bitmap.OPS, "Tensor bitmap, Tensor row_offsets, Tensor values", 2),
    "nm": (nm.OPS, "Tensor values, Tensor indices, SymInt n, SymInt m", 0),
    "csr": (csr.OPS, "Tensor row_ptr, Tensor col, Tensor values", 2),
}


def bf16_formats() -> tuple[str, ...]:
    """Kernel families with a bf16-compute product."""
    return tuple(_FAMILIES)


def supports_bf16(weight) -> bool:
    """Whether ``weight`` (a format object) has a bf16-compute product."""
    return registry.spec_of(weight).kernel_family in _FAMILIES


def _check_x(x: Tensor, cols: int) -> None:
    if x.device.type != "cpu":
        raise DataError(f"x is on {x.device}; the sparse kernels run on the CPU")
    if x.dtype != torch.bfloat16:
        raise DataError(f"x must be bfloat16 for the bf16 product, got {x.dtype}; call .bfloat16() first")
    if x.dim() != 2 or x.shape[1] != cols or not x.is_contiguous():
        raise DataError(f"x must be a contiguous (batch, {cols}) tensor, got {tuple(x.shape)}")


def _register(fmt: str, spec, schema: str, values_at: int):
    """``sparseforge::<fmt>_linear_bf16`` with its fake impl and autograd (float32 backward ops)."""
    native_name = f"{fmt}_linear_bf16"
    n_w = schema.count(",") + 1  # weight arguments

    def forward(x, *args, method="panel"):  # torch leaves out an argument equal to its default
        if len(args) > n_w + 1:
            *args, method = args
        *wargs, bias = args
        rows = spec.dims(*wargs, x.shape[-1])
        _check_x(x, x.shape[-1])
        check_bias(bias, rows)
        y = torch.empty(x.shape[0], rows, dtype=torch.float32)  # (B, out)
        getattr(native(), native_name)(np_view(x), *map(np_view, wargs), np_view(bias), y.numpy(), method=method)
        return y

    forward.__doc__ = f"y (B, out) float32 = x (B, in) bf16 @ bf16(W)^T + bias for a {spec.weight_cls.__name__}."
    op = torch.library.custom_op(f"sparseforge::{native_name}", forward, mutates_args=(),
                                 schema=f"(Tensor x, {schema}, Tensor? bias, str method=\"panel\") -> Tensor")

    @op.register_fake
    def _(x, *args, method="panel"):
        *wargs, bias = args[:n_w + 1]
        rows = spec.dims(*wargs, x.shape[-1])
        check_bias(bias, rows)
        return x.new_empty(x.shape[0], rows, dtype=torch.float32)

    def setup_context(ctx, inputs, output):
        x, wargs = inputs[0], inputs[1:1 + n_w]
        tensors = [a for a in wargs if isinstance(a, Tensor)]
        ctx.save_for_backward(x if wargs[values_at].requires_grad else None, *tensors)
        ctx.statics = tuple(a for a in wargs if not isinstance(a, Tensor))
        ctx.in_features = x.shape[1]
        ctx.has_bias = inputs[1 + n_w] is not None
        ctx.n_inputs = len(inputs)  # x, W..., bias (, method)

    def backward(ctx, dy):
        x, *bufs = ctx.saved_tensors
        wargs = (*bufs, *ctx.statics)
        dy = dy.contiguous()
        grads = [None] * ctx.n_inputs  # x, W..., bias (, method)
        if ctx.needs_input_grad[0]:
            grads[0] = spec.linear_t(dy, *wargs, ctx.in_features).to(torch.bfloat16)
        if ctx.needs_input_grad[1 + values_at]:
            grads[1 + values_at] = spec.linear_dw(x.float(), dy, *wargs).to(bufs[values_at].dtype)
        if ctx.has_bias and ctx.needs_input_grad[1 + n_w]:
            grads[1 + n_w] = dy.sum(0)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
    return op


def _method_of(method: str, weight) -> str:
    """``method`` checked: ``panel``, or ``skip`` for bfloat16 values."""
    if method not in METHODS:
        raise ConfigError(f"bf16 method {method!r} is unknown; use panel or skip (the measured choice: "
                          "sparseforge.measure.bf16_method.linear_bf16_auto)")
    if method == "skip" and weight.dtype != torch.bfloat16:
        raise ConfigError(f"bf16 method 'skip' needs bfloat16 values, this weight has {weight.dtype}; "
                          "convert its values (.to(torch.bfloat16)) or use method='panel'")
    return method


_OPS = {fmt: _register(fmt, spec, schema, at) for fmt, (spec, schema, at) in _FAMILIES.items()}
bitmap_linear_bf16, nm_linear_bf16, csr_linear_bf16 = _OPS["bitmap"], _OPS["nm"], _OPS["csr"]


def linear_bf16(x: Tensor, weight, bias: Optional[Tensor] = None, method: str = "panel") -> Tensor:
    """``bf16(x) (..., in) @ bf16(weight)^T + bias``, float32 out, for a bitmap, N:M or CSR weight.

    ``x`` of any floating dtype is converted to bf16 first. ``method``: ``"panel"`` (dense bf16 panels
    on the path :func:`sparseforge.kernels.bf16_path`: its cost is that of the dense product, its bytes
    those of the sparse weight), ``"skip"`` (the zero-skipping lanes walk over the stored values only;
    bfloat16 values); :func:`sparseforge.measure.bf16_method.linear_bf16_auto` runs the method measured for
    this weight and batch on this machine (a cache lookup). Logged at debug level.
    Any batch works; it pays from batch ~16.
    """
    family = registry.spec_of(weight).kernel_family
    if family not in _FAMILIES:
        raise ConfigError(
            f"no bf16 product for format {registry.spec_of(weight).name!r}; bf16 compute supports {', '.join(_FAMILIES)}"
        )
    spec = _FAMILIES[family][0]
    rows, cols = weight.shape
    if x.dim() < 1 or x.shape[-1] != cols:
        raise DataError(f"x must have shape (..., {cols}) to match a {rows}x{cols} weight, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"x must be a floating-point tensor, got {x.dtype}")
    x2 = x.reshape(-1, cols)  # (B, in)
    method = _method_of(method, weight)
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("bf16 %s product %dx%d, batch %d: method %s, path %s", family, rows, cols, x2.shape[0], method, bf16_path())
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.values.requires_grad or (bias is not None and bias.requires_grad))
    ):
        y = _OPS[family](x2.to(torch.bfloat16).contiguous(), *spec.unpack(weight), bias, method)
    else:
        # float32 x goes to the kernel as it is (rounded to bf16 while packed): no torch conversion op,
        # whose OpenMP workers would keep spinning beside the kernel's threads
        x2 = x2.contiguous() if x2.dtype == torch.float32 else x2.to(torch.bfloat16).contiguous()
        _, _, wargs = spec.kernel_args(weight)  # buffers validated once per format object
        if x2.device.type != "cpu":
            _check_x(x2, cols)
        if bias is not None:
            check_bias(bias, rows)
        y = torch.empty(x2.shape[0], rows, dtype=torch.float32)  # (B, out)
        getattr(native(), f"{family}_linear_bf16")(np_view(x2), *wargs, np_view(bias), y.numpy(), check_indices=False,
                                                      method=method)
    return y.reshape(*x.shape[:-1], rows)
