"""``sparseforge::nm_linear`` / ``nm_linear_t`` / ``nm_linear_dw`` over :class:`~sparseforge.formats.NMWeight`.

Buffers ``values`` float32/bfloat16 ``(out, in / m * n)`` and ``indices`` uint8 (bit-packed in-group
positions, :mod:`sparseforge.formats.nm`), then the integers ``n, m``.

Example:
    >>> import torch
    >>> from sparseforge.formats import NMWeight
    >>> from sparseforge.ops import nm_linear
    >>> w = NMWeight.from_dense(torch.tensor([[0., 1., 0., 2.]]), "2:4")
    >>> nm_linear(torch.ones(1, 4), w.values, w.indices, 2, 4, None).tolist()
    [[3.0]]
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import ModelError
from sparseforge.formats.nm import NMWeight
from sparseforge.ops._define import VALUE_DTYPES, define

__all__ = ["nm_linear", "nm_linear_t", "nm_linear_dw"]


def fit_buffers(values: Tensor, indices: Tensor, n: int, m: int, cols: int) -> int:
    if not 0 < n < m <= 256 or cols % m:
        raise ModelError(f"N:M weight needs 0 < n < m <= 256 and in_features divisible by m; got {n}:{m} with {cols} inputs")
    bits = max(1, (m - 1).bit_length())
    per_row = cols // m * n
    if tuple(values.shape[1:]) != (per_row,) or tuple(indices.shape) != (values.shape[0], (per_row * bits + 7) // 8):
        raise ModelError(
            f"{n}:{m} buffers values {tuple(values.shape)} / indices {tuple(indices.shape)} do not fit {cols} input features"
        )
    return values.shape[0]


OPS = define("nm", NMWeight, (("values", VALUE_DTYPES, 2), ("indices", (torch.uint8,), 2)), fit_buffers, statics=("n", "m"),
             unpack=lambda w: (w.values, w.indices, w.pattern.n, w.pattern.m))
nm_linear, nm_linear_t, nm_linear_dw = OPS.linear, OPS.linear_t, OPS.linear_dw
