"""``sparseforge::csr_linear`` / ``csr_linear_t`` / ``csr_linear_dw`` over :class:`~sparseforge.formats.csr.CSRWeight`.

Buffers ``row_ptr`` int32 ``(out + 1,)``, ``col`` uint16/int32 ``(nnz,)``, ``values`` float32/bfloat16
``(nnz,)`` (:mod:`sparseforge.formats.csr`). CSR does not record ``in``: the forward takes it from ``x``.

Example:
    >>> import torch
    >>> from sparseforge.formats.csr import CSRWeight
    >>> from sparseforge.ops import csr_linear
    >>> w = CSRWeight.from_dense(torch.tensor([[1., 0.], [0., 2.]]))
    >>> csr_linear(torch.ones(1, 2), w.row_ptr, w.col, w.values, None).tolist()
    [[1.0, 2.0]]
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import ModelError
from sparseforge.formats.csr import CSRWeight
from sparseforge.ops._define import INDEX_DTYPES, VALUE_DTYPES, define

__all__ = ["csr_linear", "csr_linear_t", "csr_linear_dw"]


def fit_buffers(row_ptr: Tensor, col: Tensor, values: Tensor, cols: int) -> int:
    if col.shape[0] != values.shape[0]:
        raise ModelError(f"CSR col ({col.shape[0]}) and values ({values.shape[0]}) differ in length")
    return row_ptr.shape[0] - 1


_BUFFERS = (("row_ptr", (torch.int32,), 1), ("col", INDEX_DTYPES, 1), ("values", VALUE_DTYPES, 1))
OPS = define("csr", CSRWeight, _BUFFERS, fit_buffers)
csr_linear, csr_linear_t, csr_linear_dw = OPS.linear, OPS.linear_t, OPS.linear_dw
