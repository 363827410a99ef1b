"""Sparse storage formats: one class and one file per format, documented to the byte.

* :class:`~sparseforge.formats.bitmap.BitmapWeight` — one bit per weight + packed kept values
  (any sparsity pattern).
* :class:`~sparseforge.formats.nm.NMWeight` — N:M packed values + bit-packed in-group positions.
* :class:`~sparseforge.formats.csr.CSRWeight` — compressed sparse rows, narrowest index types.
* :class:`~sparseforge.formats.fanin.FanInWeight` — constant fan-in: (rows, k) values + indices.
* :class:`~sparseforge.formats.bsr.BSRWeight` — block-sparse rows for ``Block(h, w)`` patterns.

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

from sparseforge.formats.bitmap import BitmapWeight
from sparseforge.formats.bsr import BSRWeight
from sparseforge.formats.fanin import FanInWeight
from sparseforge.formats.nm import NMWeight

__all__ = ["BitmapWeight", "NMWeight", "FanInWeight", "BSRWeight"]
