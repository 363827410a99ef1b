"""``sparseforge::bsr_linear`` / ``bsr_linear_t`` / ``bsr_linear_dw`` over :class:`~sparseforge.formats.BSRWeight`.

Buffers ``block_row_ptr`` int32 ``(out / h + 1,)``, ``block_col`` uint16/int32 ``(nblocks,)``,
``values`` float32/bfloat16 ``(nblocks, h, w)`` (:mod:`sparseforge.formats.bsr`); dW covers whole
stored blocks.

Example:
    >>> import torch
    >>> from sparseforge.formats import BSRWeight
    >>> from sparseforge.ops import bsr_linear
    >>> w = BSRWeight.from_dense(torch.tensor([[1., 2.], [3., 4.]]), "block2x2")
    >>> bsr_linear(torch.ones(1, 2), w.block_row_ptr, w.block_col, w.values, None).tolist()
    [[3.0, 7.0]]
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import ModelError
from sparseforge.formats.bsr import BSRWeight
from sparseforge.ops._define import INDEX_DTYPES, VALUE_DTYPES, define

__all__ = ["bsr_linear", "bsr_linear_t", "bsr_linear_dw"]


def _fit(block_row_ptr: Tensor, block_col: Tensor, values: Tensor, cols: int) -> int:
    h, w = values.shape[1], values.shape[2]
    if block_col.shape[0] != values.shape[0] or min(h, w) < 1 or cols % w:
        raise ModelError(
            f"BSR block_col {tuple(block_col.shape)} / values {tuple(values.shape)} do not fit {cols} input features"
        )
    return (block_row_ptr.shape[0] - 1) * h


_BUFFERS = (("block_row_ptr", (torch.int32,), 1), ("block_col", INDEX_DTYPES, 1), ("values", VALUE_DTYPES, 3))
OPS = define("bsr", BSRWeight, _BUFFERS, _fit)
bsr_linear, bsr_linear_t, bsr_linear_dw = OPS.linear, OPS.linear_t, OPS.linear_dw
