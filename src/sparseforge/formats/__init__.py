"""Sparse storage formats: one class and one file per format, documented to the byte.

* :class:`~sparseforge.formats.bitmap.BitmapWeight` — one bit per weight + packed kept values
  (any sparsity pattern).
* :class:`~sparseforge.formats.nm.NMWeight` — N:M packed values + bit-packed in-group positions.
* :class:`~sparseforge.formats.csr.CSRWeight` — compressed sparse rows, narrowest index types.
* :class:`~sparseforge.formats.fanin.FanInWeight` — constant fan-in: (rows, k) values + indices.
* :class:`~sparseforge.formats.bsr.BSRWeight` — block-sparse rows for ``Block(h, w)`` patterns.
* :class:`~sparseforge.formats.colbitmap.ColumnBitmapWeight` — per input channel a bitmap + packed
  values (activation x weight sparsity, run by :class:`~sparseforge.activation.ColumnSparseLinear`).

Each format file ends with one :func:`~sparseforge.formats.registry.register` call: the registry
(:mod:`sparseforge.formats.registry`) is the one name -> class -> pattern label -> builder table.

Every format a :class:`~sparseforge.nn.SparseLinear` runs also stacks weights row-wise by joining its
buffers (``cls.concat_rows([w1, w2])``; :func:`sparseforge.formats.concat.concat_rows` dispatches, and
warns when a format has to be densified instead).

Every format round-trips exactly: ``W.from_dense(w, ..., mask).to_dense()`` equals
``torch.where(mask, w, 0.0)`` bit for bit. The byte layouts are in each module's docstring and in
``docs/checkpoint-format.md``.

Example:
    >>> import torch
    >>> from sparseforge.formats import BitmapWeight, NMWeight
    >>> w = torch.tensor([[0., 1., 0., 2.]])
    >>> torch.equal(NMWeight.from_dense(w, "2:4").to_dense(), BitmapWeight.from_dense(w).to_dense())
    True
"""

from __future__ import annotations

# import order = registration order = the order formats are listed and measured in
from sparseforge.formats.bitmap import BitmapWeight  # noqa: I001
from sparseforge.formats.nm import NMWeight
from sparseforge.formats.csr import CSRWeight
from sparseforge.formats.fanin import FanInWeight
from sparseforge.formats.bsr import BSRWeight
from sparseforge.formats.colbitmap import ColumnBitmapWeight
from sparseforge.formats.registry import FormatSpec, register

__all__ = ["BitmapWeight", "NMWeight", "CSRWeight", "FanInWeight", "BSRWeight", "ColumnBitmapWeight", "FormatSpec", "register"]
