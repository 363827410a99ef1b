"""Constant fan-in ("condensed") storage: every output row keeps exactly ``k`` inputs.

The layout of Structured RigL's condensed representation (Lasby et al., 2023, "Dynamic Sparse
Training with Structured Sparsity"): because every row keeps the same number of inputs, values and
column indices are plain ``(rows, k)`` matrices, with no row pointers. For a ``(rows, cols)``
weight (the C++ kernels in ``csrc/fanin.h`` read exactly this; see also
``docs/checkpoint-format.md``):

=========== ========================= ============== ==========================================
buffer      dtype                     shape          order
=========== ========================= ============== ==========================================
``values``  float32 or bfloat16       ``(rows, k)``  row-major; row ``r``'s kept weights in
                                                     ascending column order
``indices`` uint16 if ``cols <=``     ``(rows, k)``  row-major; the column of each value,
            65536, else int32                        strictly ascending within a row
=========== ========================= ============== ==========================================

Bytes per kept weight: 2 (index) + 4 (fp32 value), like uint16 CSR, without the row pointers. The
kernels are the CSR kernels with implicit row pointers ``r * k`` (``docs/kernels.md``).

Zeros, signs and non-finite values follow :mod:`sparseforge.formats.bitmap`: ``from_dense(w)`` keeps
``w != 0``; ``from_dense(w, mask)`` keeps exactly ``mask`` (explicit zeros stored); ``to_dense()``
is ``torch.where(mask, w, +0.0)`` bit for bit. A mask whose rows keep different numbers of inputs
is refused (prune with the ``FanIn`` pattern, or use CSR).

Example:
    >>> import torch
    >>> from sparseforge.formats import FanInWeight
    >>> w = torch.tensor([[0., 1.5, 2.], [3., 0., -1.]])
    >>> fw = FanInWeight.from_dense(w)
    >>> fw.k, fw.indices.tolist(), fw.values.tolist()
    (2, [[1, 2], [0, 2]], [[1.5, 2.0], [3.0, -1.0]])
    >>> torch.equal(fw.to_dense(), w)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats._stored import StoredBuffers
from sparseforge.formats.bitmap import check_weight
from sparseforge.formats.concat import assemble, check_row_parts
from sparseforge.formats.csr import index_dtype
from sparseforge.formats.memory import hugepage_backed, hugepage_cat
from sparseforge.formats.registry import FormatSpec, register
from sparseforge.patterns import FanIn

__all__ = ["FanInWeight"]

_VALUE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class FanInWeight(StoredBuffers):
    """A 2-D weight with constant fan-in (see the module doc for the byte layout)."""

    KEY: ClassVar[str] = "fanin_"
    FIELDS: ClassVar[tuple[str, ...]] = ("values", "indices")

    shape: tuple[int, int]
    values: torch.Tensor  # (rows, k) float32 / bfloat16
    indices: torch.Tensor  # (rows, k) uint16 / int32

    def __post_init__(self) -> None:
        rows, cols = (int(s) for s in self.shape)
        object.__setattr__(self, "shape", (rows, cols))
        where = f"fan-in weight of shape {rows}x{cols}"
        if self.values.dim() != 2 or self.values.shape[0] != rows or self.values.dtype not in _VALUE_DTYPES:
            raise ModelError(f"{where}: values must be float32 or bfloat16 of shape ({rows}, k), got {self.values.dtype} {tuple(self.values.shape)}")
        k = self.values.shape[1]
        if k > cols:
            raise ModelError(f"{where}: k={k} inputs per row is more than in_features={cols}")
        if self.indices.dtype != index_dtype(cols) or tuple(self.indices.shape) != (rows, k):
            raise ModelError(
                f"{where}: indices must be {index_dtype(cols)} of shape {(rows, k)} (the narrowest type for {cols} columns), "
                f"got {self.indices.dtype} {tuple(self.indices.shape)}"
            )
        if rows * k:
            idx = self.indices.to(torch.int64)  # (rows, k)
            if int(idx.max()) >= cols or bool((idx[:, 1:] <= idx[:, :-1]).any()):
                raise ModelError(f"{where}: indices must be < {cols} and strictly ascending within each row; the checkpoint is corrupt")

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor | None = None) -> "FanInWeight":
        """Compress ``w`` (rows, cols); ``mask`` (bool, True = keep) defaults to ``w != 0``.

        Raises :class:`ConfigError` naming two rows with different counts when the rows do not all
        keep the same number of inputs.
        """
        check_weight(w, mask)
        if w.dtype not in _VALUE_DTYPES:
            raise ConfigError(f"FanInWeight stores float32 or bfloat16 values, got {w.dtype}; convert the weight first")
        rows, cols = w.shape
        keep = (w != 0) if mask is None else mask  # (rows, cols)
        counts = keep.sum(dim=1)  # (rows,)
        k = int(counts[0]) if rows else 0
        if rows and bool((counts != k).any()):
            bad = int(torch.nonzero(counts != k)[0, 0])
            raise ConfigError(
                f"constant fan-in needs every row to keep the same number of inputs, but row 0 keeps {k} and row {bad} "
                f"keeps {int(counts[bad])} (counts range {int(counts.min())}..{int(counts.max())}); prune with the "
                "'fanin' pattern (masks.mask_from_scores) or use CSRWeight"
            )
        idx = keep.nonzero()[:, 1].reshape(rows, k)  # row-major, ascending within a row
        return cls((rows, cols), hugepage_backed(w[keep].reshape(rows, k).contiguous()),
                   hugepage_backed(idx.to(index_dtype(cols)).contiguous()))

    @classmethod
    def concat_rows(cls, parts: "list[FanInWeight]") -> "FanInWeight":
        """The rows of ``parts`` (the same fan-in ``k``) stacked in order (:mod:`sparseforge.formats.concat`):
        values and indices appended.

        Example:
            >>> a = FanInWeight.from_dense(torch.tensor([[0., 1.], [2., 0.]]))
            >>> FanInWeight.concat_rows([a, a]).indices.tolist()
            [[1], [0], [1], [0]]
        """
        cols, _ = check_row_parts(parts, cls)
        rows = [p for p in parts if p.shape[0]] or list(parts[:1])  # a part without rows has no k of its own
        ks = sorted({p.k for p in rows})
        if len(ks) > 1:
            raise ConfigError(f"concat_rows joins fan-in weights of one k, got k = {ks}; use CSR for different counts")
        values = hugepage_cat([p.values for p in rows])  # (sum rows, k)
        indices = hugepage_cat([p.indices for p in rows])  # (sum rows, k)
        return assemble(cls, shape=(sum(p.shape[0] for p in parts), cols), values=values, indices=indices)

    @property
    def k(self) -> int:
        """Kept inputs per output row."""
        return self.values.shape[1]

    def mask(self) -> torch.Tensor:
        """Bool keep-mask (rows, cols)."""
        out = torch.zeros(self.shape, dtype=torch.bool)
        return out.scatter_(1, self.indices.to(torch.int64), True)

    def to_dense(self) -> torch.Tensor:
        """Dense (rows, cols) weight: kept entries bit-exact, pruned entries ``+0.0``."""
        out = torch.zeros(self.shape, dtype=self.values.dtype)
        return out.scatter_(1, self.indices.to(torch.int64), self.values)


register(FormatSpec(
    "fanin", FanInWeight, general=False, since_version=2, rank=30,
    build=lambda w, pattern, keep: FanInWeight.from_dense(w, keep),
    load=lambda state, shape, pattern, prefix="": FanInWeight.from_state_dict(state, shape, prefix=prefix),
    pattern_of=lambda obj: FanIn(obj.k) if obj.k else None,
))
