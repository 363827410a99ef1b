"""``sparseforge::sparse_input_linear``: a linear layer that skips its small input channels.

``y (B, out) = mask(x) (B, in) @ weight_t (in, out) + bias`` where ``mask`` zeroes the channels with
``|x| <= threshold`` (one threshold for the layer, or one per input channel) and ``weight_t`` is the
weight stored input-channel-major (``nn.Linear.weight.T``, contiguous), float32 or bfloat16. The
native kernel (``csrc/sparse_input.h``) never reads a skipped channel's weights, so at batch 1 the
time falls with the fraction of skipped channels (TEAL, Liu et al. 2024, arXiv:2408.14690). NaN
inputs are never skipped (they propagate as in the dense product); a threshold of 0 skips exact
zeros only and ``+inf`` every finite input.

Batch 1 (decode) runs the native sparse GEMV; many rows (prefill) run a GEMM over the same
``weight_t`` (by default torch's, see :func:`sparse_input_linear`'s ``algo``): one copy of the
weights serves both.

Registered with a fake impl (shapes for ``torch.compile``) and autograd (the straight-through
product of the kept channels: ``dx = (dy @ weight_t^T) * kept``, ``dweight_t = mask(x)^T @ dy``,
``dbias = dy.sum(0)``; the threshold gets no gradient). :func:`sparse_input_reference` is the same
function in plain torch.

Example:
    >>> import torch
    >>> from sparseforge.ops.sparse_input import sparse_input_linear
    >>> w_t = torch.tensor([[1., 2.], [3., 4.], [5., 6.]])          # (in=3, out=2)
    >>> x = torch.tensor([[0.1, 1.0, -2.0]])
    >>> sparse_input_linear(x, w_t, torch.tensor([0.5]), None).tolist()  # channel 0 skipped
    [[-7.0, -8.0]]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparseforge.errors import DataError, ModelError, SparseforgeError
from sparseforge.kernels import native

__all__ = ["sparse_input_linear", "sparse_input_reference", "sparse_input_masked", "active_counts", "gemv_args", "ALGOS"]

ALGOS = ("auto", "gemv", "gemm", "torch")


def _np(t: Tensor):
    t = t.detach()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _check_weights(weight_t: Tensor, thresholds: Tensor, bias: Optional[Tensor]) -> tuple[int, int]:
    if weight_t.device.type != "cpu" or weight_t.dim() != 2 or weight_t.dtype not in (torch.float32, torch.bfloat16):
        raise ModelError(
            f"weight_t must be a 2-D float32 or bfloat16 CPU tensor (in, out), got {weight_t.dtype} "
            f"{tuple(weight_t.shape)} on {weight_t.device}"
        )
    if not weight_t.is_contiguous():
        raise ModelError("weight_t must be contiguous (input-channel-major); store linear.weight.t().contiguous()")
    n_in, n_out = weight_t.shape
    if thresholds.dtype != torch.float32 or thresholds.dim() != 1 or thresholds.shape[0] not in (1, n_in):
        raise ModelError(
            f"thresholds must be float32 of shape (1,) or ({n_in},), got {thresholds.dtype} {tuple(thresholds.shape)}"
        )
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n_out,)):
        raise ModelError(f"bias must be float32 of shape ({n_out},), got {bias.dtype} {tuple(bias.shape)}")
    return n_in, n_out


def _check(x: Tensor, weight_t: Tensor, thresholds: Tensor, bias: Optional[Tensor]) -> tuple[int, int]:
    n_in, n_out = _check_weights(weight_t, thresholds, bias)
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != n_in:
        raise DataError(f"x must be a float32 CPU tensor of shape (batch, {n_in}), got {x.dtype} {tuple(x.shape)} on {x.device}")
    return n_in, n_out


def gemv_args(weight_t: Tensor, thresholds: Tensor, bias: Optional[Tensor]) -> tuple:
    """``(native kernel, weight view, thresholds view, bias view)``, checked once, for a caller that
    runs many eager batch-1 calls on the same tensors (the views share their memory):
    ``kernel(x.numpy(), *views, y.numpy())`` with ``x`` float32 ``(1, in)`` and ``y`` ``(1, out)``."""
    _check_weights(weight_t, thresholds, bias)
    views = (_np(weight_t), _np(thresholds.contiguous()), None if bias is None else _np(bias.contiguous()))
    return (native().sparse_input_linear, *views)


def _forward(x: Tensor, weight_t: Tensor, thresholds: Tensor, bias: Optional[Tensor], algo: str = "auto") -> Tensor:
    _check(x, weight_t, thresholds, bias)
    if algo == "auto":
        # one row, or rows whose active channels together number at most `in`: the sparse GEMV
        # reads less than the whole weight; otherwise torch's GEMM over the same [in, out] weight
        sparse = x.shape[0] <= 1 or int((~(x.abs() <= thresholds)).sum()) <= x.shape[1]
        algo = "gemv" if sparse else "torch"
    if algo == "torch":
        y = sparse_input_masked(x, thresholds).to(weight_t.dtype) @ weight_t  # (B, out)
        y = y.float()
        return y if bias is None else y + bias
    y = torch.empty(x.shape[0], weight_t.shape[1], dtype=torch.float32)  # (B, out)
    b = None if bias is None else _np(bias.contiguous())
    try:
        native().sparse_input_linear(_np(x.contiguous()), _np(weight_t), _np(thresholds.contiguous()), b, y.numpy(), "", algo)
    except ValueError as exc:  # the native checks (a negative or NaN threshold, ...); ConfigError passes through
        if isinstance(exc, SparseforgeError):
            raise
        raise DataError(str(exc)) from exc
    return y


@torch.library.custom_op("sparseforge::sparse_input_linear", mutates_args=())
def _sparse_input_op(x: Tensor, weight_t: Tensor, thresholds: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _forward(x, weight_t, thresholds, bias)


@_sparse_input_op.register_fake
def _(x, weight_t, thresholds, bias):
    _check(x, weight_t, thresholds, bias)
    return x.new_empty(x.shape[0], weight_t.shape[1])


def sparse_input_masked(x: Tensor, thresholds: Tensor) -> Tensor:
    """``x`` with the channels ``|x| <= threshold`` set to 0 (NaN kept), in plain torch."""
    return torch.where(x.abs() <= thresholds.to(x.dtype), torch.zeros((), dtype=x.dtype), x)


def _setup(ctx, inputs, output):
    x, weight_t, thresholds, bias = inputs
    ctx.save_for_backward(x, weight_t, thresholds)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, weight_t, thresholds = ctx.saved_tensors
    kept = ~(x.abs() <= thresholds)  # (B, in)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = (dy @ weight_t.float().t()) * kept  # (B, in)
    if ctx.needs_input_grad[1]:
        dw = (sparse_input_masked(x, thresholds).t() @ dy).to(weight_t.dtype)  # (in, out)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum(0)
    return dx, dw, None, db


_sparse_input_op.register_autograd(_backward, setup_context=_setup)


def sparse_input_linear(x: Tensor, weight_t: Tensor, thresholds: Tensor, bias: Optional[Tensor] = None, *,
                        algo: str = "auto") -> Tensor:
    """``mask(x) (B, in) @ weight_t (in, out) + bias`` by the native kernel (see the module doc).

    ``algo`` (eager calls; the registered op always uses ``"auto"``):

    * ``"auto"``: the native sparse GEMV for one row, or while the rows' active channels together
      number at most ``in``; otherwise ``"torch"``;
    * ``"gemv"`` / ``"gemm"``: the native sparse GEMV per row / the native masked GEMM;
    * ``"torch"``: ``mask(x)`` cast to the weight's dtype, then torch's matmul over ``weight_t``
      (the same stored weights: oneDNN/MKL, AMX for bfloat16 where the CPU has it). A bfloat16
      weight thus sees a bfloat16-rounded input, as a dense bfloat16 ``nn.Linear`` does.
    """
    if algo not in ALGOS:
        raise DataError(f"algo must be one of {ALGOS}, got {algo!r}")
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight_t, bias))
    ):
        return _sparse_input_op(x, weight_t, thresholds, bias)
    return _forward(x, weight_t, thresholds, bias, algo)  # eager inference: no custom-op dispatch


def sparse_input_reference(x: Tensor, weight_t: Tensor, thresholds: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The same product in plain torch (float32): the dense baseline the kernel is tested against."""
    y = sparse_input_masked(x.float(), thresholds.float()) @ weight_t.float()  # (B, out)
    return y if bias is None else y + bias.float()


def active_counts(x: Tensor, thresholds: Tensor) -> Tensor:
    """Active (kept) input channels per row of ``x`` ``(B, in)``: int64 ``(B,)``, by the native counter."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise DataError(f"x must be float32 (batch, in), got {x.dtype} {tuple(x.shape)}")
    counts = torch.empty(x.shape[0], dtype=torch.int64)
    native().sparse_input_count(_np(x.contiguous()), _np(thresholds.float().contiguous()), counts.numpy())
    return counts
