"""Dense bf16 GEMV for decode: ``y = x @ W^T + bias`` with ``x (B, in)`` and ``W (out, in)`` in bfloat16.

torch's bf16 ``F.linear`` at batch 1 streams its weight at well under the rate of its own float32
GEMV on some CPUs (~11 against ~25 GB/s on a Sapphire Rapids-class Xeon at 2 threads), though bf16
has half the bytes. The native kernel (``csrc/dense_bf16.h``) streams a few weight rows at a time
(8 on AVX-512, 4 on AVX2) and sums each row's products in float32: ``vdpbf16ps`` where the CPU has AVX512_BF16 (as llama.cpp
does), else the weights widened to float32 (AVX-512F, AVX2, scalar). Activations are bfloat16 (a
bf16 model's own; convert float32 ones with ``.bfloat16()``); the output is bfloat16, rounded to
nearest even once after the float32 bias, as a bf16 ``nn.Linear`` returns it.

It is the arithmetic of torch's bf16 product (bf16 operands, float32 sums, one rounding) in another
summation order, so outputs agree with ``F.linear`` up to float32 summation order before the bf16
rounding: an element can round the other way (one bf16 step, more where the sum cancels).
``vdpbf16ps`` also treats bf16 subnormals as zero. Results do not depend on the thread count.
Forward only (inference).

Ops: ``sparseforge::dense_bf16_gemv(x, weight, bias) -> Tensor`` (fake impl for ``torch.compile``);
:class:`BoundDenseBf16` binds one layer's buffers once for a decode loop.

Example:
    >>> import torch
    >>> from sparseforge.ops.dense_bf16 import dense_bf16_gemv
    >>> w = torch.tensor([[1., 0., 2.], [0., 0., -1.]], dtype=torch.bfloat16)
    >>> dense_bf16_gemv(torch.ones(1, 3, dtype=torch.bfloat16), w, None).tolist()
    [[3.0, -1.0]]
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from sparseforge.errors import DataError
from sparseforge.kernels import native
from sparseforge.ops._define import np_view

__all__ = ["dense_bf16_gemv", "BoundDenseBf16", "dense_bf16_kernel"]


def dense_bf16_kernel(isa: str = "") -> str:
    """The kernel a call would run now: ``"avx512_bf16"``, ``"avx512"``, ``"avx2"`` or ``"scalar"``
    (``SPARSEFORGE_ISA``; ``SPARSEFORGE_AVX512_BF16=0`` turns ``vdpbf16ps`` off within the avx512 path)."""
    return native().dense_bf16_kernel(isa)


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if t.device.type != "cpu" or t.dtype != torch.bfloat16 or t.dim() != 2 or not t.is_contiguous():
            raise DataError(f"{name} must be a contiguous 2-d bfloat16 CPU tensor, got {t.dtype} {tuple(t.shape)} on "
                            f"{t.device}; call .bfloat16().contiguous() first")
    if x.shape[1] != weight.shape[1]:
        raise DataError(f"x must have shape (batch, {weight.shape[1]}) to match the weight's input features, got {tuple(x.shape)}")
    if bias is not None and (bias.device.type != "cpu" or not bias.is_floating_point() or tuple(bias.shape) != (weight.shape[0],)):
        raise DataError(f"bias must be a floating-point CPU tensor of shape ({weight.shape[0]},), got {bias.dtype} "
                        f"{tuple(bias.shape)} on {bias.device}")


def _bias32(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.detach().to(torch.float32).contiguous()  # exact for a bf16 bias


@torch.library.custom_op("sparseforge::dense_bf16_gemv", mutates_args=())
def dense_bf16_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x (B, in) @ weight (out, in)^T + bias`` as bfloat16 ``(B, out)``; float32 sums (module doc)."""
    _check(x, weight, bias)
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)  # (B, out)
    native().dense_bf16_gemv(np_view(x), np_view(weight), np_view(_bias32(bias)), np_view(y))
    return y


@dense_bf16_gemv.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    _check(x, weight, bias)
    return x.new_empty(x.shape[0], weight.shape[0])


class BoundDenseBf16:
    """:func:`dense_bf16_gemv` with one layer's weight and bias bound once: ``bound(x)`` for a contiguous bfloat16
    ``x (B, in)`` in eager inference returns bfloat16 ``(B, out)``, bitwise what the op returns. The weight is read
    in place (in-place updates are seen; a replaced weight needs a new binding).

    Example:
        >>> import torch
        >>> bound = BoundDenseBf16(torch.eye(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16))
        >>> bound(torch.tensor([[1., 2.]], dtype=torch.bfloat16)).tolist()
        [[2.0, 3.0]]
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        _check(torch.empty(1, weight.shape[-1], dtype=torch.bfloat16), weight, bias)
        self.weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self._bias = _bias32(bias)
        self._w, self._b = np_view(self.weight), np_view(self._bias)
        self._gemv = native().dense_bf16_gemv

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != self.in_features or not x.is_contiguous() or not x.is_cpu:
            _check(x, self.weight, None)
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.bfloat16)  # (B, out)
        self._gemv(np_view(x), self._w, self._b, np_view(y))
        return y

    def bind(self, x: Tensor, out: Tensor) -> Callable[[], None]:
        """A zero-argument call that computes ``x @ W^T + bias`` into ``out`` (bfloat16 ``(B, out)``) from the fixed
        buffers' current contents (a decode loop's), checked once here: a call is the native GEMV alone."""
        self(x)
        if out.dtype != torch.bfloat16 or out.shape != (x.shape[0], self.out_features) or not out.is_contiguous():
            raise DataError(f"out must be a contiguous bfloat16 ({x.shape[0]}, {self.out_features}) tensor, got "
                            f"{out.dtype} {tuple(out.shape)}")
        return partial(self._gemv, np_view(x), self._w, self._b, np_view(out))
