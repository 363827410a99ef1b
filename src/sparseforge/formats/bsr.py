"""Block-sparse rows (BSR) storage for ``Block(h, w)`` patterns: dense ``h x w`` tiles on a grid.

Block sparsity (e.g. Gray et al., 2017, "GPU Kernels for Block-Sparse Weights") keeps or prunes
whole aligned tiles, so each kept tile is multiplied as a small dense matrix. For a ``(rows, cols)``
weight with ``rows % h == 0`` and ``cols % w == 0`` (the C++ kernels in ``csrc/bsr.h`` read exactly
this; see also ``docs/checkpoint-format.md``):

================= =========================== ==================== =================================
buffer            dtype                       shape                order
================= =========================== ==================== =================================
``block_row_ptr`` int32                       ``(rows/h + 1,)``    block row ``R``'s blocks are
                                                                   ``[ptr[R], ptr[R+1])``; starts at
                                                                   0, ends at ``nblocks``
``block_col``     uint16 if ``cols/w <=``     ``(nblocks,)``       block column (``column // w``) of
                  65536, else int32                                each block, strictly ascending
                                                                   within a block row
``values``        float32 or bfloat16         ``(nblocks, h, w)``  block ``b``'s entry ``[i, jj]`` is
                                                                   weight ``(R*h + i,
                                                                   block_col[b]*w + jj)``
================= =========================== ==================== =================================

A block is stored when any of its entries is kept; its other entries are stored as explicit
``+0.0`` (so ``mask()`` is block-granular, and training a BSR layer trains whole blocks).
``to_dense()`` is ``torch.where(mask, w, +0.0)`` bit for bit for the mask given to ``from_dense``.

Example:
    >>> import torch
    >>> from sparseforge.formats import BSRWeight
    >>> w = torch.zeros(4, 4); w[:2, 2:] = torch.tensor([[1., 2.], [3., 4.]])
    >>> bw = BSRWeight.from_dense(w, "block2x2")
    >>> bw.block_row_ptr.tolist(), bw.block_col.tolist(), bw.values.tolist()
    ([0, 1, 1], [1], [[[1.0, 2.0], [3.0, 4.0]]])
    >>> torch.equal(bw.to_dense(), w)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats._stored import StoredBuffers
from sparseforge.formats.bitmap import check_weight
from sparseforge.formats.concat import assemble, check_row_parts, offset_pointers
from sparseforge.formats.csr import index_dtype
from sparseforge.formats.memory import hugepage_backed, hugepage_cat
from sparseforge.formats.registry import FormatSpec, register
from sparseforge.patterns import Block, Pattern, parse

__all__ = ["BSRWeight"]

_VALUE_DTYPES = (torch.float32, torch.bfloat16)
_INT32_MAX = 2**31 - 1


def _as_block(block: "Pattern | str | tuple[int, int]") -> Block:
    if isinstance(block, tuple):
        return Block(*block)
    pattern = parse(block)
    if not isinstance(pattern, Block):
        raise ConfigError(f"BSRWeight needs a block pattern such as 'block4x4', got {pattern}")
    return pattern


@dataclass(frozen=True, eq=False)
class BSRWeight(StoredBuffers):
    """A 2-D weight in block-sparse-row format (see the module doc for the byte layout)."""

    KEY: ClassVar[str] = "bsr_"
    FIELDS: ClassVar[tuple[str, ...]] = ("block_row_ptr", "block_col", "values")

    shape: tuple[int, int]
    block_row_ptr: torch.Tensor  # int32 (rows/h + 1,)
    block_col: torch.Tensor  # uint16 / int32 (nblocks,)
    values: torch.Tensor  # (nblocks, h, w) float32 / bfloat16

    def __post_init__(self) -> None:
        rows, cols = (int(s) for s in self.shape)
        object.__setattr__(self, "shape", (rows, cols))
        where = f"BSR weight of shape {rows}x{cols}"
        if self.values.dim() != 3 or self.values.dtype not in _VALUE_DTYPES or min(self.values.shape[1:]) < 1:
            raise ModelError(f"{where}: values must be float32 or bfloat16 of shape (nblocks, h, w), got {self.values.dtype} {tuple(self.values.shape)}")
        nblocks, h, w = self.values.shape
        if rows % h or cols % w:
            raise ModelError(f"{where}: {h}x{w} blocks do not tile it")
        if self.block_row_ptr.dtype != torch.int32 or tuple(self.block_row_ptr.shape) != (rows // h + 1,):
            raise ModelError(f"{where}: block_row_ptr must be int32 of shape {(rows // h + 1,)}, got {self.block_row_ptr.dtype} {tuple(self.block_row_ptr.shape)}")
        if self.block_col.dtype != index_dtype(cols // w) or tuple(self.block_col.shape) != (nblocks,):
            raise ModelError(f"{where}: block_col must be {index_dtype(cols // w)} of shape {(nblocks,)}, got {self.block_col.dtype} {tuple(self.block_col.shape)}")
        ptr = self.block_row_ptr.to(torch.int64)
        if int(ptr[0]) != 0 or int(ptr[-1]) != nblocks or bool((ptr[1:] < ptr[:-1]).any()):
            raise ModelError(f"{where}: block_row_ptr must start at 0, never decrease and end at nblocks={nblocks}; the checkpoint is corrupt")
        if nblocks:
            col = self.block_col.to(torch.int64)
            row_of = self._block_row_of()
            if int(col.max()) >= cols // w or bool(((col[1:] <= col[:-1]) & (row_of[1:] == row_of[:-1])).any()):
                raise ModelError(f"{where}: block columns must be < {cols // w} and strictly ascending within a block row; the checkpoint is corrupt")

    @classmethod
    def from_dense(
        cls, w: torch.Tensor, block: "Pattern | str | tuple[int, int]", mask: torch.Tensor | None = None
    ) -> "BSRWeight":
        """Compress ``w`` (rows, cols) into ``block`` (``"block4x4"``, ``Block(4, 4)`` or ``(4, 4)``) tiles.

        ``mask`` (bool, True = keep) defaults to ``w != 0``; a tile is stored if any entry is kept.
        """
        blk = _as_block(block)
        check_weight(w, mask)
        if w.dtype not in _VALUE_DTYPES:
            raise ConfigError(f"BSRWeight stores float32 or bfloat16 values, got {w.dtype}; convert the weight first")
        rows, cols = w.shape
        h, bw = blk.h, blk.w
        if rows % h or cols % bw:
            raise ConfigError(f"BSR {blk} needs a shape divisible by {h}x{bw}, got {rows}x{cols}; use CSRWeight or BitmapWeight")
        keep = (w != 0) if mask is None else mask  # (rows, cols)
        kept = torch.where(keep, w, torch.zeros((), dtype=w.dtype))  # (rows, cols)
        tiles = kept.reshape(rows // h, h, cols // bw, bw).permute(0, 2, 1, 3)  # (R, C, h, w)
        on = keep.reshape(rows // h, h, cols // bw, bw).any(dim=3).any(dim=1)  # (R, C)
        nblocks = int(on.sum())
        if nblocks > _INT32_MAX:
            raise ConfigError(f"BSRWeight holds at most 2^31-1 blocks, got {nblocks}; split the layer")
        ptr = torch.zeros(rows // h + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(on.sum(dim=1), 0)
        col = on.nonzero()[:, 1]  # (nblocks,) row-major
        return cls((rows, cols), ptr.to(torch.int32), hugepage_backed(col.to(index_dtype(cols // bw)).contiguous()),
                   hugepage_backed(tiles[on].contiguous()))

    @classmethod
    def concat_rows(cls, parts: "list[BSRWeight]") -> "BSRWeight":
        """The rows of ``parts`` (one block size) stacked in order (:mod:`sparseforge.formats.concat`): block
        row pointers of each part offset by the blocks before it, block columns and blocks appended.

        Example:
            >>> a = BSRWeight.from_dense(torch.ones(2, 4), "block2x2")
            >>> BSRWeight.concat_rows([a, a]).block_row_ptr.tolist()
            [0, 2, 4]
        """
        cols, _ = check_row_parts(parts, cls)
        blocks = sorted({str(p.block) for p in parts})
        if len(blocks) > 1:
            raise ConfigError(f"concat_rows joins BSR weights of one block size, got {', '.join(blocks)}")
        ptr = offset_pointers([p.block_row_ptr for p in parts], _INT32_MAX, "blocks")  # (sum rows / h + 1,)
        block_col = hugepage_cat([p.block_col for p in parts])  # (sum nblocks,)
        values = hugepage_cat([p.values for p in parts])  # (sum nblocks, h, w)
        return assemble(cls, shape=(sum(p.shape[0] for p in parts), cols), block_row_ptr=ptr, block_col=block_col,
                        values=values)

    @property
    def block(self) -> Block:
        return Block(int(self.values.shape[1]), int(self.values.shape[2]))

    def _block_row_of(self) -> torch.Tensor:
        ptr = self.block_row_ptr.to(torch.int64)
        return torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr[1:] - ptr[:-1])  # (nblocks,)

    def _scatter(self, blocks: torch.Tensor) -> torch.Tensor:
        """(nblocks, h, w) -> dense (rows, cols), zeros outside the stored blocks."""
        rows, cols = self.shape
        h, w = self.block.h, self.block.w
        out = torch.zeros(rows // h, cols // w, h, w, dtype=blocks.dtype)
        out[self._block_row_of(), self.block_col.to(torch.int64)] = blocks
        return out.permute(0, 2, 1, 3).reshape(rows, cols)

    def mask(self) -> torch.Tensor:
        """Bool (rows, cols) of stored entries: whole stored blocks."""
        return self._scatter(torch.ones(self.values.shape, dtype=torch.bool))

    def to_dense(self) -> torch.Tensor:
        """Dense (rows, cols) weight: stored entries bit-exact, others ``+0.0``."""
        return self._scatter(self.values)


def _build(w: torch.Tensor, pattern: "Pattern | None", keep: "torch.Tensor | None") -> BSRWeight:
    if not isinstance(pattern, Block):
        raise ConfigError(f"format='bsr' needs a block pattern such as 'block4x4', got {pattern}")
    return BSRWeight.from_dense(w, pattern, keep)


register(FormatSpec(
    "bsr", BSRWeight, general=False, since_version=2, rank=20, pattern_in_label=True, build=_build,
    load=lambda state, shape, pattern, prefix="": BSRWeight.from_state_dict(state, shape, prefix=prefix),
    pattern_of=lambda obj: obj.block,
))
