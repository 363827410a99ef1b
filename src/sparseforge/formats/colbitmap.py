"""Column bitmap storage: per *input channel* one bit per output says kept, kept values packed.

The row-major formats (bitmap, CSR, N:M, ...) put the weights one input channel feeds in every row,
so a skipped input channel (activation sparsity) saves no bytes: a 64-byte line of a row mixes 16+
channels. Here each input channel's weights are contiguous, so a kernel that skips an inactive
channel skips its bitmap and values entirely, and activation and weight sparsity multiply:
bytes per weight ~ ``(1 - s_act) * ((1 - s_w) * value_size + 1/8)`` plus 8 bytes per 512 outputs of
``block_ptr`` (notes: ``shared/research/next-capabilities.md`` section 2.5; TEAL, Liu et al. 2024,
arXiv:2408.14690, stores its weights column-major for the same reason). The native kernel is
``csrc/column_sparse.h`` (:mod:`sparseforge.ops.column_sparse`); the module that runs it is
:class:`~sparseforge.activation.ColumnSparseLinear`.

Layout of a logical ``(rows, cols)`` = ``(out, in)`` weight ``W``; ``words = ceil(rows / 64)``,
``nblk = ceil(rows / 512)``:

============= ======== =========================== ==========================================
buffer        dtype    shape                       order
============= ======== =========================== ==========================================
``bitmap``    int64    ``(cols, words)``           one row of 64-bit words per input channel
                                                   ``i``; bit ``j % 64`` (LSB first) of word
                                                   ``j // 64`` is ``W[j, i]``; 1 = kept. Bits
                                                   past ``rows`` are 0.
``values``    float32  ``(nnz,)``                  kept entries channel-major: channel 0's by
              bfloat16                             ascending output, then channel 1's, ...
              or int8
``scales``    float32  ``(rows,)``                 only with int8 values: ``W[j, i] =
                                                   scales[j] * q`` (one scale per output row,
                                                   the grid of :mod:`~sparseforge.formats.quantized`)
``block_ptr`` int64    ``(cols * nblk + 1,)``      derived from the bitmap, never stored:
                                                   entry ``i * nblk + b`` = kept entries before
                                                   (channel ``i``, output ``512 * b``); the last
                                                   is ``nnz``. Threads that own 512-column
                                                   tiles start there without counting bits.
============= ======== =========================== ==========================================

Checkpoints do not store this format (``stored=False`` in the registry): a compressed checkpoint
keeps the weight in its row-major format (bitmap, N:M, ...) and its thresholds in the
``activation`` section, and ``sparseforge.load(path, sparse=True)`` builds the column layout of
each layer that is both pruned and activation-sparse at load time (one layer densified at a time).
``SparseLinear`` does not run it (``sparse_linear=False``).

Zeros, signs and non-finite values follow :mod:`sparseforge.formats.bitmap`: ``from_dense(w)``
keeps ``w != 0``; ``from_dense(w, mask)`` keeps exactly ``mask``; ``to_dense()`` is
``torch.where(mask, w, +0.0)`` bit for bit. ``values_dtype=torch.int8`` quantizes the kept values
per output row (or on a caller's ``scales=`` grid); ``to_dense()`` is then the float32
``scales[j] * q``, and :meth:`ColumnBitmapWeight.from_format` keeps an int8 bitmap / N:M / CSR
weight's ``q`` and ``scales`` as they are.

Example:
    >>> import torch
    >>> from sparseforge.formats.colbitmap import ColumnBitmapWeight
    >>> w = torch.tensor([[1.5, 0.0], [0.0, 0.0], [-2.0, 3.0]])   # (out=3, in=2)
    >>> cw = ColumnBitmapWeight.from_dense(w)
    >>> cw.bitmap.tolist(), cw.values.tolist(), cw.block_ptr.tolist()
    ([[5], [4]], [1.5, -2.0, 3.0], [0, 2, 3])
    >>> torch.equal(cw.to_dense(), w)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats._stored import StoredBuffers
from sparseforge.formats.bitmap import check_weight, pack_bits, unpack_bits
from sparseforge.formats.memory import hugepage_backed
from sparseforge.formats.quantized import check_scales, quantize_rows
from sparseforge.formats.registry import FormatSpec, register

__all__ = ["ColumnBitmapWeight", "BLOCK_COLUMNS", "VALUE_DTYPES"]

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
BLOCK_COLUMNS = 512  # outputs per block_ptr entry (csrc/column_sparse.h kColBlock)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)
_CHANNEL_CHUNK = 1024  # channels counted at a time (bounds the temporary per-byte counts)


def _block_counts(bitmap: torch.Tensor, rows: int) -> torch.Tensor:
    """Kept entries per (channel, 512-output block): int64 ``(cols, nblk)`` from the int64 words."""
    cols, words = bitmap.shape
    nblk = (rows + BLOCK_COLUMNS - 1) // BLOCK_COLUMNS
    counts = torch.zeros(cols, nblk, dtype=torch.int64)
    if words == 0:
        return counts
    pad_bytes = nblk * (BLOCK_COLUMNS // 8) - words * 8
    for c0 in range(0, cols, _CHANNEL_CHUNK):
        raw = bitmap[c0:c0 + _CHANNEL_CHUNK].contiguous().view(torch.uint8)  # (chunk, words * 8), little endian
        raw = torch.nn.functional.pad(raw, (0, pad_bytes))  # (chunk, nblk * 64)
        per_byte = _POPCOUNT[raw.long()]  # (chunk, nblk * 64)
        counts[c0:c0 + _CHANNEL_CHUNK] = per_byte.reshape(raw.shape[0], nblk, BLOCK_COLUMNS // 8).sum(-1)
    return counts


@dataclass(frozen=True, eq=False)
class ColumnBitmapWeight(StoredBuffers):
    """A 2-D ``(out, in)`` weight stored per input channel (see the module doc for the byte layout)."""

    KEY: ClassVar[str] = "colbitmap_"
    FIELDS: ClassVar[tuple[str, ...]] = ("bitmap", "values")

    shape: tuple[int, int]
    bitmap: torch.Tensor  # int64 (in, ceil(out / 64))
    values: torch.Tensor  # (nnz,) float32 / bfloat16 / int8
    scales: torch.Tensor | None = None  # float32 (out,), int8 values only
    block_ptr: torch.Tensor = field(init=False, repr=False)  # int64 (in * nblk + 1,), derived

    def __post_init__(self) -> None:
        rows, cols = (int(s) for s in self.shape)
        object.__setattr__(self, "shape", (rows, cols))
        where = f"column bitmap weight of shape {rows}x{cols}"
        words = (rows + 63) // 64
        if self.bitmap.dtype != torch.int64 or tuple(self.bitmap.shape) != (cols, words) or not self.bitmap.is_contiguous():
            raise ModelError(f"{where}: bitmap must be contiguous int64 of shape {(cols, words)}, "
                             f"got {self.bitmap.dtype} {tuple(self.bitmap.shape)}")
        if self.values.dim() != 1 or self.values.dtype not in VALUE_DTYPES:
            raise ModelError(f"{where}: values must be 1-D float32, bfloat16 or int8, got {self.values.dtype} "
                             f"{tuple(self.values.shape)}")
        check_scales(self.scales, self.values, rows, where)
        if rows % 64 and cols and bool(((self.bitmap[:, -1] >> (rows % 64)) != 0).any()):
            raise ModelError(f"{where}: bitmap bits past output {rows} are set")
        counts = _block_counts(self.bitmap, rows)  # (in, nblk)
        block_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
        block_ptr[1:] = torch.cumsum(counts.reshape(-1), 0)
        if int(block_ptr[-1]) != self.values.numel():
            raise ModelError(f"{where}: the bitmap marks {int(block_ptr[-1])} kept entries but "
                             f"{self.values.numel()} values are stored")
        object.__setattr__(self, "block_ptr", block_ptr)

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor | None = None, *, values_dtype: torch.dtype | None = None,
                   scales: torch.Tensor | None = None) -> "ColumnBitmapWeight":
        """Compress ``w`` ``(out, in)``; ``mask`` (bool, True = keep) defaults to ``w != 0``;
        ``values_dtype`` float32, bfloat16 (default: ``w``'s dtype, bfloat16 stays bfloat16, else
        float32) or int8: one scale per output row, round to nearest, or the grid of ``scales``
        (float32 ``(out,)``) when given (:func:`~sparseforge.formats.quantized.quantize_rows`).

        Example:
            >>> import torch
            >>> w = torch.tensor([[0.5, -1.0], [0.0, 0.25]])   # (out=2, in=2)
            >>> cw = ColumnBitmapWeight.from_dense(w, values_dtype=torch.int8)
            >>> cw.values.tolist(), [round(s * 127, 3) for s in cw.scales.tolist()]
            ([64, -127, 127], [1.0, 0.25])
        """
        check_weight(w, mask)
        dtype = values_dtype or (torch.bfloat16 if w.dtype == torch.bfloat16 else torch.float32)
        if dtype not in VALUE_DTYPES:
            raise ConfigError(f"the column bitmap format stores float32, bfloat16 or int8 values, got {dtype}")
        if scales is not None and dtype != torch.int8:
            raise ConfigError("scales= needs values_dtype=torch.int8")
        keep = (w != 0) if mask is None else mask  # (out, in)
        keep_t = keep.t()  # (in, out)
        rows, cols = w.shape
        words = (rows + 63) // 64
        bits = torch.zeros(cols, words * 64, dtype=torch.bool)
        bits[:, :rows] = keep_t
        packed = pack_bits(bits)  # (in, words * 8) uint8
        bitmap = packed.view(torch.int64) if words else torch.zeros(cols, 0, dtype=torch.int64)  # (in, words), little endian
        if dtype == torch.int8:
            q, scales = quantize_rows(w, keep, scales)  # (out, in) int8, (out,) float32
            values = q.t()[keep_t].contiguous()  # (nnz,) channel-major
        else:
            values = w.t()[keep_t].to(dtype).contiguous()  # (nnz,) channel-major
        return cls((rows, cols), hugepage_backed(bitmap.contiguous()), hugepage_backed(values), scales)

    @classmethod
    def from_format(cls, weight, values_dtype: torch.dtype | None = None) -> "ColumnBitmapWeight":
        """The column layout of another format object (``to_dense`` / ``mask`` of one layer). Values
        keep their dtype (int8: the same ``q`` and row ``scales``, no requantization) unless
        ``values_dtype`` says otherwise (int8 from float values: round to nearest per row).

        Example:
            >>> import torch
            >>> from sparseforge.formats.bitmap import BitmapWeight
            >>> bw = BitmapWeight.from_dense(torch.tensor([[0.5, 0.0], [0.0, -2.0]]), values_dtype=torch.int8)
            >>> cw = ColumnBitmapWeight.from_format(bw)
            >>> cw.values.dtype, torch.equal(cw.scales, bw.scales), torch.equal(cw.to_dense(), bw.to_dense())
            (torch.int8, True, True)
        """
        dense = weight.to_dense()  # (out, in); int8 formats: float32 scales[r] * q
        mask = weight.mask() if hasattr(weight, "mask") else dense != 0
        dtype = values_dtype or (weight.dtype if weight.dtype in VALUE_DTYPES else torch.float32)
        scales = getattr(weight, "scales", None) if dtype == torch.int8 else None
        if dense.dtype not in (torch.float32, torch.bfloat16):
            dense = dense.float()
        return cls.from_dense(dense, mask, values_dtype=dtype, scales=scales)

    @property
    def nbytes(self) -> int:
        """Bytes in memory: bitmap, values, scales (int8) and the derived block pointers."""
        buffers = (self.bitmap, self.values, self.block_ptr) + (() if self.scales is None else (self.scales,))
        return sum(t.numel() * t.element_size() for t in buffers)

    def mask(self) -> torch.Tensor:
        """Bool keep-mask ``(out, in)``."""
        rows, cols = self.shape
        if rows == 0:
            return torch.zeros(0, cols, dtype=torch.bool)
        return unpack_bits(self.bitmap.view(torch.uint8), self.bitmap.shape[1] * 64)[:, :rows].t()

    def to_dense(self) -> torch.Tensor:
        """Dense ``(out, in)`` weight: kept entries bit-exact (int8: float32 ``scales[j] * q``), pruned ``+0.0``."""
        rows, cols = self.shape
        dtype = torch.float32 if self.scales is not None else self.values.dtype
        out_t = torch.zeros(cols, rows, dtype=dtype)  # (in, out)
        out_t[self.mask().t()] = self.values.to(dtype)
        if self.scales is not None:
            out_t *= self.scales  # (in, out) * (out,): row j of W scaled by scales[j]
        return out_t.t().contiguous()


register(FormatSpec(
    "colbitmap", ColumnBitmapWeight, general=False, stored=False, sparse_linear=False,
    build=lambda w, pattern, keep, **kw: ColumnBitmapWeight.from_dense(w, keep, **kw),
    load=lambda state, shape, pattern, prefix="": ColumnBitmapWeight.from_state_dict(state, shape, prefix=prefix),
))
