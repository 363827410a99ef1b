"""Bitmap storage: one bit per weight says kept or pruned, kept values packed densely.

Layout of a ``(rows, cols)`` weight (the C++ kernels read exactly this; see also
``docs/checkpoint-format.md``):

=============== ======== ========================= ==========================================
buffer          dtype    shape                     order
=============== ======== ========================= ==========================================
``bitmap``      uint8    ``(rows, ceil(cols/8))``  row-major; bit ``j`` (LSB first, ``j=0`` is
                                                   the least significant bit) of byte ``b`` of
                                                   row ``r`` is column ``8*b + j``; 1 = kept.
                                                   Padding bits past ``cols`` are 0.
``values``      float32, ``(nnz,)``                kept entries in row-major order (row 0 left
                bfloat16                           to right, then row 1, ...)
                or int8
``scales``      float32  ``(rows,)``               only with int8 values: row ``r``'s weights
                                                   are ``scales[r] * values[...]``
                                                   (:mod:`sparseforge.formats.quantized`)
``row_offsets`` int64    ``(rows + 1,)``           derived, never stored on disk:
                                                   ``row_offsets[r]`` = kept entries before row
                                                   ``r``; row ``r``'s values are
                                                   ``values[row_offsets[r]:row_offsets[r+1]]``
=============== ======== ========================= ==========================================

Zeros, signs and non-finite values: ``from_dense(w)`` keeps ``w != 0``, so ``-0.0`` and ``+0.0``
are both pruned and NaN / inf are kept. ``from_dense(w, mask)`` keeps exactly ``mask`` (kept
zeros, including ``-0.0``, are stored as explicit values). ``to_dense()`` returns
``torch.where(mask, w, +0.0)`` bit for bit: kept entries keep their exact bits (NaN payloads,
``-0.0``), pruned entries are ``+0.0``. This equals ``w * mask`` under ``==`` wherever the pruned
entries of ``w`` are finite (``w * mask`` would give ``-0.0`` for pruned negatives).

int8 values: ``from_dense(w, values_dtype=torch.int8)`` stores ``round(w / scale)`` with one
scale per row (or checks ``w`` against a caller's ``scales=``); ``to_dense()`` then returns the
float32 dequantized weight ``scales[r] * q``.

Example:
    >>> import torch
    >>> from sparseforge.formats import BitmapWeight
    >>> w = torch.tensor([[1.5, 0.0, 0.0, -2.0]])
    >>> bw = BitmapWeight.from_dense(w)
    >>> bw.bitmap.tolist(), bw.values.tolist()
    ([[9]], [1.5, -2.0])
    >>> torch.equal(bw.to_dense(), w)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats._stored import StoredBuffers
from sparseforge.formats.concat import assemble, cat_scales, check_row_parts, offset_pointers
from sparseforge.formats.memory import hugepage_backed, hugepage_cat
from sparseforge.formats.quantized import check_scales, quantize_rows, row_scales
from sparseforge.formats.registry import FormatSpec, register

__all__ = ["BitmapWeight", "pack_bits", "unpack_bits"]

_BIT_WEIGHTS = [1 << j for j in range(8)]  # value of bit j in a byte, LSB first


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (rows, L) into uint8 (rows, ceil(L/8)), bit j of byte b = column 8b+j."""
    rows, length = bits.shape
    nbytes = (length + 7) // 8
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.uint8, device=bits.device)
    padded[:, :length] = bits.to(torch.uint8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    # each byte is a sum of distinct powers of two <= 255, so uint8 never overflows
    return (padded.reshape(rows, nbytes, 8) * weights).sum(dim=2, dtype=torch.uint8)  # (rows, nbytes)


def unpack_bits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (rows, nbytes) -> bool (rows, length)."""
    rows, nbytes = packed.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (rows, nbytes, 8)
    return bits.reshape(rows, nbytes * 8)[:, :length].bool()


_POPCOUNT = tuple(bin(i).count("1") for i in range(256))
_POPCOUNT_CHUNK = 1 << 20  # bytes of bitmap counted at a time (bounds the temporary index tensor)


def row_popcounts(packed: torch.Tensor) -> torch.Tensor:
    """Set bits per row of a packed uint8 bitmap (rows, nbytes) -> int64 (rows,); temporary memory
    is bounded (a lookup table over at most ``_POPCOUNT_CHUNK`` bytes at a time), so validating a
    large layer never unpacks it to one byte per weight."""
    rows, nbytes = packed.shape
    table = torch.tensor(_POPCOUNT, dtype=torch.int64, device=packed.device)
    out = torch.zeros(rows, dtype=torch.int64, device=packed.device)
    step = max(1, _POPCOUNT_CHUNK // max(1, nbytes))
    for r in range(0, rows, step):
        out[r:r + step] = table[packed[r:r + step].long()].sum(dim=1)
    return out


def check_weight(w: torch.Tensor, mask: torch.Tensor | None) -> None:
    if w.dim() != 2:
        raise ConfigError(f"sparse formats store 2-D weights (rows, cols), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ConfigError(f"sparse formats store floating-point weights, got dtype {w.dtype}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ConfigError(f"mask must be a torch.bool tensor (True = keep), got {mask.dtype}; pass mask.bool()")
        if mask.shape != w.shape:
            raise ConfigError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(w.shape)}")


@dataclass(frozen=True, eq=False)
class BitmapWeight(StoredBuffers):
    """A 2-D weight in bitmap format (see the module doc for the byte layout)."""

    KEY: ClassVar[str] = ""
    FIELDS: ClassVar[tuple[str, ...]] = ("bitmap", "values")

    shape: tuple[int, int]
    bitmap: torch.Tensor  # uint8 (rows, ceil(cols/8))
    values: torch.Tensor  # (nnz,) float32 / bfloat16 / int8
    scales: torch.Tensor | None = None  # float32 (rows,), int8 values only
    row_offsets: torch.Tensor = field(init=False, repr=False)  # int64 (rows+1,), derived

    def __post_init__(self) -> None:
        rows, cols = (int(s) for s in self.shape)
        object.__setattr__(self, "shape", (rows, cols))
        where = f"bitmap weight of shape {rows}x{cols}"
        if self.bitmap.dtype != torch.uint8 or tuple(self.bitmap.shape) != (rows, (cols + 7) // 8):
            raise ModelError(
                f"{where}: bitmap must be uint8 of shape {(rows, (cols + 7) // 8)}, "
                f"got {self.bitmap.dtype} {tuple(self.bitmap.shape)}; the checkpoint is corrupt"
            )
        if self.values.dim() != 1 or not (self.values.is_floating_point() or self.values.dtype == torch.int8):
            raise ModelError(f"{where}: values must be a 1-D float or int8 tensor, got {self.values.dtype} {tuple(self.values.shape)}")
        check_scales(self.scales, self.values, rows, where)
        if cols % 8 and rows and bool((self.bitmap[:, -1] >> (cols % 8)).any()):
            raise ModelError(f"{where}: padding bits past column {cols} are set; the checkpoint is corrupt")
        per_row = row_popcounts(self.bitmap)  # (rows,), without unpacking the bits
        offsets = torch.zeros(rows + 1, dtype=torch.int64, device=self.bitmap.device)
        offsets[1:] = torch.cumsum(per_row, 0)
        if int(offsets[-1]) != self.values.numel():
            raise ModelError(
                f"{where}: bitmap marks {int(offsets[-1])} kept entries but {self.values.numel()} values are stored"
            )
        object.__setattr__(self, "row_offsets", offsets)

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor | None = None, *, values_dtype: torch.dtype | None = None,
                   scales: torch.Tensor | None = None) -> "BitmapWeight":
        """Compress ``w`` (rows, cols); ``mask`` (bool, True = keep) defaults to ``w != 0``.

        ``values_dtype=torch.int8`` quantizes the kept values with one scale per row, or on the
        grid of ``scales`` (float32 (rows,)) when given (:func:`~sparseforge.formats.quantized.quantize_rows`).
        """
        check_weight(w, mask)
        keep = (w != 0) if mask is None else mask  # (rows, cols)
        if values_dtype != torch.int8:
            if scales is not None:
                raise ConfigError("scales= needs values_dtype=torch.int8")
            return cls(tuple(w.shape), hugepage_backed(pack_bits(keep)), hugepage_backed(w[keep].contiguous()))
        q, scales = quantize_rows(w, keep, scales)  # (rows, cols) int8, (rows,) float32
        return cls(tuple(w.shape), hugepage_backed(pack_bits(keep)), hugepage_backed(q[keep].contiguous()), scales)

    @classmethod
    def concat_rows(cls, parts: "list[BitmapWeight]") -> "BitmapWeight":
        """The rows of ``parts`` stacked in order (:mod:`sparseforge.formats.concat`): bitmaps and values
        appended (rows never share a bitmap byte; values are row-major), int8 scales concatenated.

        Example:
            >>> a, b = BitmapWeight.from_dense(torch.eye(3)), BitmapWeight.from_dense(-torch.eye(3))
            >>> torch.equal(BitmapWeight.concat_rows([a, b]).to_dense(), torch.cat([torch.eye(3), -torch.eye(3)]))
            True
        """
        cols, _ = check_row_parts(parts, cls)
        bitmap = hugepage_cat([p.bitmap for p in parts])  # (sum rows, ceil(cols/8))
        values = hugepage_cat([p.values for p in parts])  # (sum nnz,)
        offsets = offset_pointers([p.row_offsets for p in parts], 2**63 - 1, "entries", torch.int64)  # (sum rows + 1,)
        return assemble(cls, shape=(bitmap.shape[0], cols), bitmap=bitmap, values=values, scales=cat_scales(parts),
                        row_offsets=offsets)

    def dequantized_values(self) -> torch.Tensor:
        """The values as float32 ``scales[r] * q`` (int8), or as stored (float); same layout."""
        if self.scales is None:
            return self.values
        return self.values.float() * row_scales(self.scales, self.row_offsets.diff())  # (nnz,)

    def mask(self) -> torch.Tensor:
        """Bool keep-mask (rows, cols)."""
        return unpack_bits(self.bitmap, self.shape[1])

    def to_dense(self) -> torch.Tensor:
        """Dense (rows, cols) weight: kept entries bit-exact (int8: float32 ``scales[r] * q``), pruned ``+0.0``."""
        values = self.dequantized_values()
        out = torch.zeros(self.shape, dtype=values.dtype, device=values.device)
        out[self.mask()] = values
        return out


register(FormatSpec(
    "bitmap", BitmapWeight, rank=40, int8_values=True,
    build=lambda w, pattern, keep, **quant: BitmapWeight.from_dense(w, keep, **quant),
    load=lambda state, shape, pattern, prefix="": BitmapWeight.from_state_dict(state, shape, prefix=prefix),
))
