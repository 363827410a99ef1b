"""CSR storage with the narrowest index types: compressed sparse rows for unstructured sparsity.

Layout of a ``(rows, cols)`` weight (the C++ kernels in ``csrc/csr.h`` read exactly this):

=========== ========================= ============ ============================================
buffer      dtype                     shape        order
=========== ========================= ============ ============================================
``row_ptr`` int32                     ``(rows+1,)`` row ``r``'s entries are
                                                   ``[row_ptr[r], row_ptr[r+1])``; starts at 0,
                                                   ends at ``nnz``, non-decreasing
``col``     uint16 if ``cols <=``     ``(nnz,)``   column of each entry, strictly ascending
            65536, else int32                      within a row
``values``  float32, bfloat16 or int8 ``(nnz,)``   entries in row-major order
``scales``  float32                   ``(rows,)``  only with int8 values: row ``r``'s weights are
                                                   ``scales[r] * values[...]``
                                                   (:mod:`sparseforge.formats.quantized`)
=========== ========================= ============ ============================================

Bytes per kept weight: 2 (index) + 4 (fp32 value) = 6 with uint16 indices, against 8 for the int32
CSR torch builds and 12 for its default int64 one; plus 4 bytes per row. At high sparsity (>= ~90%)
CSR reads fewer bytes than a bitmap (1 bit per weight, kept or not); below that the bitmap wins.

Zeros, signs and non-finite values follow :mod:`sparseforge.formats.bitmap`: ``from_dense(w)``
keeps ``w != 0``; ``from_dense(w, mask)`` keeps exactly ``mask`` (explicit zeros stored);
``to_dense()`` is ``torch.where(mask, w, +0.0)`` bit for bit.

Example:
    >>> import torch
    >>> from sparseforge.formats.csr import CSRWeight
    >>> w = torch.tensor([[0., 1.5, 0.], [2., 0., -3.]])
    >>> cw = CSRWeight.from_dense(w)
    >>> cw.row_ptr.tolist(), cw.col.tolist(), cw.values.tolist(), cw.col.dtype
    ([0, 1, 3], [1, 0, 2], [1.5, 2.0, -3.0], torch.uint16)
    >>> torch.equal(cw.to_dense(), w)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats._stored import StoredBuffers
from sparseforge.formats.bitmap import BitmapWeight, check_weight, unpack_bits
from sparseforge.formats.concat import assemble, cat_scales, check_row_parts, offset_pointers
from sparseforge.formats.memory import hugepage_backed, hugepage_cat
from sparseforge.formats.quantized import check_scales, quantize_rows, row_scales
from sparseforge.formats.registry import FormatSpec, register

__all__ = ["CSRWeight", "index_dtype"]

_INT32_MAX = 2**31 - 1
_CHUNK_WEIGHTS = 1 << 22  # weights unpacked at a time by from_bitmap


def index_dtype(cols: int) -> torch.dtype:
    """Narrowest column-index dtype for ``cols`` columns: uint16 up to 65536, else int32."""
    return torch.uint16 if cols <= 65536 else torch.int32


@dataclass(frozen=True, eq=False)
class CSRWeight(StoredBuffers):
    """A 2-D weight in CSR format (see the module doc for the byte layout)."""

    KEY: ClassVar[str] = "csr_"
    FIELDS: ClassVar[tuple[str, ...]] = ("row_ptr", "col", "values")

    shape: tuple[int, int]
    row_ptr: torch.Tensor  # int32 (rows+1,)
    col: torch.Tensor  # uint16 or int32 (nnz,)
    values: torch.Tensor  # (nnz,) float32 / bfloat16 / int8
    scales: torch.Tensor | None = None  # float32 (rows,), int8 values only

    def __post_init__(self) -> None:
        rows, cols = (int(s) for s in self.shape)
        object.__setattr__(self, "shape", (rows, cols))
        where = f"CSR weight of shape {rows}x{cols}"
        if self.row_ptr.dtype != torch.int32 or tuple(self.row_ptr.shape) != (rows + 1,):
            raise ModelError(f"{where}: row_ptr must be int32 of shape {(rows + 1,)}, got {self.row_ptr.dtype} {tuple(self.row_ptr.shape)}")
        if self.col.dtype != index_dtype(cols) or self.col.dim() != 1:
            raise ModelError(f"{where}: col must be 1-D {index_dtype(cols)} (the narrowest type for {cols} columns), got {self.col.dtype} {tuple(self.col.shape)}")
        if self.values.dim() != 1 or self.values.dtype not in (torch.float32, torch.bfloat16, torch.int8):
            raise ModelError(f"{where}: values must be a 1-D float32, bfloat16 or int8 tensor, got {self.values.dtype} {tuple(self.values.shape)}")
        check_scales(self.scales, self.values, rows, where)
        nnz = self.values.numel()
        if self.col.numel() != nnz:
            raise ModelError(f"{where}: {self.col.numel()} column indices but {nnz} values")
        ptr = self.row_ptr.to(torch.int64)
        if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr[1:] < ptr[:-1]).any()):
            raise ModelError(f"{where}: row_ptr must start at 0, never decrease and end at nnz={nnz}; the checkpoint is corrupt")
        if nnz:
            col = self.col.to(torch.int64)
            if int(col.max()) >= cols:
                raise ModelError(f"{where}: a column index is >= {cols}; the checkpoint is corrupt")
            row_of = torch.repeat_interleave(torch.arange(rows), ptr[1:] - ptr[:-1])  # (nnz,)
            bad = (col[1:] <= col[:-1]) & (row_of[1:] == row_of[:-1])
            if bool(bad.any()):
                raise ModelError(f"{where}: column indices must be strictly ascending within each row; the checkpoint is corrupt")

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor | None = None, *, values_dtype: torch.dtype | None = None,
                   scales: torch.Tensor | None = None) -> "CSRWeight":
        """Compress ``w`` (rows, cols); ``mask`` (bool, True = keep) defaults to ``w != 0``.

        Values keep ``w``'s dtype (float32 or bfloat16); ``values_dtype=torch.int8`` quantizes them
        with one scale per row, or on the grid of ``scales`` (:func:`~sparseforge.formats.quantized.quantize_rows`).
        """
        check_weight(w, mask)
        if values_dtype == torch.int8:
            keep = (w != 0) if mask is None else mask  # (rows, cols)
            q, scales = quantize_rows(w, keep, scales)  # (rows, cols) int8, (rows,) float32
            f = cls.from_dense(q.float(), keep)
            return cls(f.shape, f.row_ptr, f.col, hugepage_backed(q[keep].contiguous()), scales)
        if scales is not None:
            raise ConfigError("scales= needs values_dtype=torch.int8")
        if w.dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"CSRWeight stores float32 or bfloat16 values, got {w.dtype}; convert the weight first")
        rows, cols = w.shape
        keep = (w != 0) if mask is None else mask  # (rows, cols)
        nnz = int(keep.sum())
        if nnz > _INT32_MAX:
            raise ConfigError(f"CSRWeight holds at most 2^31-1 entries (int32 row pointers), got {nnz}; split the layer")
        row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(keep.sum(dim=1), 0)
        col = keep.nonzero()[:, 1]  # (nnz,) row-major, ascending within a row
        return cls((rows, cols), row_ptr.to(torch.int32), hugepage_backed(col.to(index_dtype(cols)).contiguous()),
                   hugepage_backed(w[keep].contiguous()))

    @classmethod
    def from_bitmap(cls, bw: BitmapWeight) -> "CSRWeight":
        """The entries of a :class:`BitmapWeight` in CSR, without building its dense matrix.

        Both layouts keep the values in row-major order, so ``values`` (and int8 ``scales``) are shared, not copied; the row
        pointers are the bitmap's own ``row_offsets``; the column indices come from the bits, ``_CHUNK_WEIGHTS`` weights' worth of rows at a time (the
        only temporary memory: one bool per weight of that chunk).

        Example:
            >>> w = torch.tensor([[0.0, 2.0, 0.0, 3.0], [1.0, 0.0, 0.0, 0.0]])
            >>> c = CSRWeight.from_bitmap(BitmapWeight.from_dense(w))
            >>> c.row_ptr.tolist(), c.col.tolist(), torch.equal(c.to_dense(), w)
            ([0, 2, 3], [1, 3, 0], True)
        """
        rows, cols = bw.shape
        nnz = bw.nnz
        if nnz > _INT32_MAX:
            raise ConfigError(f"CSRWeight holds at most 2^31-1 entries (int32 row pointers), got {nnz}; keep the bitmap")
        ptr = bw.row_offsets  # (rows + 1,) int64, derived by BitmapWeight from the bits
        col = torch.empty(nnz, dtype=index_dtype(cols))
        step = max(1, _CHUNK_WEIGHTS // max(1, cols))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            keep = unpack_bits(bw.bitmap[r0:r1], cols)  # (r1 - r0, cols) bool
            col[int(ptr[r0]):int(ptr[r1])] = keep.nonzero()[:, 1].to(col.dtype)
        return cls((rows, cols), ptr.to(torch.int32), hugepage_backed(col), bw.values, bw.scales)

    @classmethod
    def concat_rows(cls, parts: "list[CSRWeight]") -> "CSRWeight":
        """The rows of ``parts`` stacked in order (:mod:`sparseforge.formats.concat`): row pointers of each
        part offset by the entries before it, column indices and values appended, int8 scales concatenated.

        Example:
            >>> a = CSRWeight.from_dense(torch.tensor([[0., 1.], [2., 3.]]))
            >>> CSRWeight.concat_rows([a, a]).row_ptr.tolist()
            [0, 1, 3, 4, 6]
        """
        cols, _ = check_row_parts(parts, cls)
        row_ptr = offset_pointers([p.row_ptr for p in parts], _INT32_MAX, "entries")  # (sum rows + 1,)
        col = hugepage_cat([p.col for p in parts])  # (sum nnz,)
        values = hugepage_cat([p.values for p in parts])  # (sum nnz,)
        return assemble(cls, shape=(row_ptr.numel() - 1, cols), row_ptr=row_ptr, col=col, values=values,
                        scales=cat_scales(parts))

    def mask(self) -> torch.Tensor:
        """Bool keep-mask (rows, cols)."""
        rows, cols = self.shape
        out = torch.zeros(rows, cols, dtype=torch.bool)
        out[self._row_of(), self.col.to(torch.int64)] = True
        return out

    def dequantized_values(self) -> torch.Tensor:
        """The values as float32 ``scales[r] * q`` (int8), or as stored (float); same layout."""
        if self.scales is None:
            return self.values
        return self.values.float() * row_scales(self.scales, self.row_ptr.to(torch.int64).diff())  # (nnz,)

    def to_dense(self) -> torch.Tensor:
        """Dense (rows, cols) weight: kept entries bit-exact (int8: float32 ``scales[r] * q``), pruned ``+0.0``."""
        values = self.dequantized_values()
        out = torch.zeros(self.shape, dtype=values.dtype)
        out[self._row_of(), self.col.to(torch.int64)] = values
        return out

    def _row_of(self) -> torch.Tensor:
        ptr = self.row_ptr.to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.shape[0]), ptr[1:] - ptr[:-1])  # (nnz,)


register(FormatSpec(
    "csr", CSRWeight, stored=False, int8_values=True,  # checkpoints store the bitmap it is converted from (CSRWeight.from_bitmap)
    build=lambda w, pattern, keep, **quant: CSRWeight.from_dense(w, keep, **quant),
    load=lambda state, shape, pattern, prefix="": CSRWeight.from_state_dict(state, shape, prefix=prefix),
))
