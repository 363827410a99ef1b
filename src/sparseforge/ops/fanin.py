"""``sparseforge::fanin_linear`` / ``fanin_linear_t`` / ``fanin_linear_dw`` over :class:`~sparseforge.formats.FanInWeight`.

Buffers ``values`` float32/bfloat16 and ``indices`` uint16/int32, both ``(out, k)``
(:mod:`sparseforge.formats.fanin`): the CSR kernels with implicit row pointers ``r * k``.

Example:
    >>> import torch
    >>> from sparseforge.formats import FanInWeight
    >>> from sparseforge.ops import fanin_linear
    >>> w = FanInWeight.from_dense(torch.tensor([[0., 2.], [3., 0.]]))
    >>> fanin_linear(torch.ones(1, 2), w.values, w.indices, None).tolist()
    [[2.0, 3.0]]
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import ModelError
from sparseforge.formats.fanin import FanInWeight
from sparseforge.ops._define import INDEX_DTYPES, VALUE_DTYPES, define

__all__ = ["fanin_linear", "fanin_linear_t", "fanin_linear_dw"]


def _fit(values: Tensor, indices: Tensor, cols: int) -> int:
    if indices.shape != values.shape or values.shape[1] > cols:
        raise ModelError(f"fan-in values {tuple(values.shape)} / indices {tuple(indices.shape)} do not fit {cols} input features")
    return values.shape[0]


OPS = define("fanin", FanInWeight, (("values", VALUE_DTYPES, 2), ("indices", INDEX_DTYPES, 2)), _fit)
fanin_linear, fanin_linear_t, fanin_linear_dw = OPS.linear, OPS.linear_t, OPS.linear_dw
