"""``sparseforge::bitmap_linear`` / ``bitmap_linear_t`` / ``bitmap_linear_dw`` over :class:`~sparseforge.formats.BitmapWeight`.

Buffers ``bitmap`` uint8 ``(out, ceil(in / 8))``, ``row_offsets`` int64 ``(out + 1,)``, ``values``
float32/bfloat16 ``(nnz,)`` (:mod:`sparseforge.formats.bitmap`).

Example:
    >>> import torch
    >>> from sparseforge.formats import BitmapWeight
    >>> from sparseforge.ops import bitmap_linear
    >>> w = BitmapWeight.from_dense(torch.tensor([[1., 0., 2.]]))
    >>> bitmap_linear(torch.ones(1, 3), w.bitmap, w.row_offsets, w.values, None).tolist()
    [[3.0]]
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import ModelError
from sparseforge.formats.bitmap import BitmapWeight
from sparseforge.ops._define import VALUE_DTYPES, define

__all__ = ["bitmap_linear", "bitmap_linear_t", "bitmap_linear_dw"]


def fit_buffers(bitmap: Tensor, row_offsets: Tensor, values: Tensor, cols: int) -> int:
    if bitmap.shape[1] != (cols + 7) // 8 or row_offsets.shape[0] != bitmap.shape[0] + 1:
        raise ModelError(
            f"bitmap {tuple(bitmap.shape)} / row_offsets {tuple(row_offsets.shape)} do not fit {cols} input features"
        )
    return bitmap.shape[0]


_BUFFERS = (("bitmap", (torch.uint8,), 2), ("row_offsets", (torch.int64,), 1), ("values", VALUE_DTYPES, 1))
OPS = define("bitmap", BitmapWeight, _BUFFERS, fit_buffers)
bitmap_linear, bitmap_linear_t, bitmap_linear_dw = OPS.linear, OPS.linear_t, OPS.linear_dw
