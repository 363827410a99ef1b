"""N:M packed storage: N values and N packed positions for every group of M inputs.

N:M semi-structured sparsity (Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks";
Zhou et al., 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch")
keeps at most N of every M consecutive inputs of a row. For a ``(rows, cols)`` weight with
``cols % m == 0``, ``G = cols // m`` groups per row and ``b = ceil(log2(m))`` bits per position
(2 for 2:4, 3 for 4:8):

=========== ========= ================================ =========================================
buffer      dtype     shape                            order
=========== ========= ================================ =========================================
``values``  weight's  ``(rows, G * n)``                row-major; group ``g`` of row ``r`` owns
            float                                      ``values[r, g*n:(g+1)*n]``, its kept
                                                       values in ascending position order
``indices`` uint8     ``(rows, ceil(G * n * b / 8))``  the positions (0..m-1 within the group) of
                                                       those values, as one little-endian bit
                                                       stream per row: position ``k`` of the row
                                                       (``k = g*n + i``) occupies stream bits
                                                       ``k*b .. k*b+b-1``, its least significant
                                                       bit first; stream bit ``t`` is bit
                                                       ``t % 8`` (LSB first) of byte ``t // 8``.
                                                       Each row is padded with 0 bits to a whole
                                                       byte; rows never share a byte.
``scales``  float32   ``(rows,)``                      only with int8 values: row ``r``'s weights
                                                       are ``scales[r] * values[r, :]``
                                                       (:mod:`sparseforge.formats.quantized`)
=========== ========= ================================ =========================================

Values are float32, bfloat16, or int8 with ``scales`` (``from_dense(..., values_dtype=torch.int8)``;
``to_dense()`` then returns the float32 dequantized weight).

Every group stores exactly ``n`` entries: a group with fewer than ``n`` kept entries is padded with
explicit ``+0.0`` values at its lowest unused positions, so positions within a group are strictly
ascending and distinct. Worked example (2:4, one row ``[0, a, 0, b, c, 0, d, 0]``): positions
``[1, 3, 0, 2]``, values ``[a, b, c, d]``, indices byte ``1 | 3<<2 | 0<<4 | 2<<6 = 0x8D``.

Zeros, signs and non-finite values follow :mod:`sparseforge.formats.bitmap`: ``from_dense(w)``
keeps ``w != 0``, ``from_dense(w, pattern, mask)`` keeps ``mask``; ``to_dense()`` equals
``torch.where(mask, w, +0.0)`` bit for bit (NaN / inf / kept ``-0.0`` preserved).

Example:
    >>> import torch
    >>> from sparseforge.formats import NMWeight
    >>> w = torch.tensor([[0., 1., 0., 2., 3., 0., 4., 0.]])
    >>> nw = NMWeight.from_dense(w, "2:4")
    >>> nw.values.tolist(), nw.indices.tolist()
    ([[1.0, 2.0, 3.0, 4.0]], [[141]])
    >>> torch.equal(nw.to_dense(), w)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats._stored import StoredBuffers
from sparseforge.formats.concat import assemble, cat_scales, check_row_parts
from sparseforge.formats.bitmap import check_weight, pack_bits, unpack_bits
from sparseforge.formats.memory import hugepage_backed, hugepage_cat, hugepage_copy
from sparseforge.formats.quantized import check_scales, quantize_rows
from sparseforge.formats.registry import FormatSpec, register
from sparseforge.masks import topk_mask
from sparseforge.patterns import DEFAULT_NM, NM, Pattern, parse

__all__ = ["NMWeight", "index_bits"]


_VALIDATE_CHUNK = 1 << 20  # stored positions validated at a time

def index_bits(m: int) -> int:
    """Bits per stored position for groups of ``m``: ``ceil(log2(m))``."""
    return max(1, math.ceil(math.log2(m)))


def _pack_indices(positions: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 (rows, K) positions -> uint8 (rows, ceil(K*bits/8)) little-endian bit stream."""
    rows, k = positions.shape
    shifts = torch.arange(bits, device=positions.device)
    stream = (positions.unsqueeze(-1) >> shifts) & 1  # (rows, K, bits), LSB first
    return pack_bits(stream.reshape(rows, k * bits).bool())


def _unpack_indices(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_indices`: uint8 (rows, nbytes) -> int64 (rows, K)."""
    rows = packed.shape[0]
    stream = unpack_bits(packed, k * bits).to(torch.int64).reshape(rows, k, bits)  # (rows, K, bits)
    weights = 1 << torch.arange(bits, device=packed.device)
    return (stream * weights).sum(dim=2)


def _as_nm(pattern: "Pattern | str") -> NM:
    pattern = parse(pattern)
    if not isinstance(pattern, NM):
        raise ConfigError(f"NMWeight needs an N:M pattern such as '2:4', got {pattern}")
    return pattern


@dataclass(frozen=True, eq=False)
class NMWeight(StoredBuffers):
    """A 2-D weight in N:M packed format (see the module doc for the byte layout)."""

    KEY: ClassVar[str] = "nm_"
    FIELDS: ClassVar[tuple[str, ...]] = ("values", "indices")

    shape: tuple[int, int]
    pattern: NM
    values: torch.Tensor  # (rows, G*n) float32 / bfloat16 / int8
    indices: torch.Tensor  # uint8 (rows, ceil(G*n*b/8))
    scales: torch.Tensor | None = None  # float32 (rows,), int8 values only

    def __post_init__(self) -> None:
        rows, cols = (int(s) for s in self.shape)
        object.__setattr__(self, "shape", (rows, cols))
        object.__setattr__(self, "pattern", _as_nm(self.pattern))
        n, m = self.pattern.n, self.pattern.m
        where = f"{n}:{m} weight of shape {rows}x{cols}"
        if cols % m:
            raise ModelError(f"{where}: cols={cols} is not divisible by M={m}")
        k = cols // m * n
        nbytes = (k * index_bits(m) + 7) // 8
        if not (self.values.is_floating_point() or self.values.dtype == torch.int8) or tuple(self.values.shape) != (rows, k):
            raise ModelError(f"{where}: values must be float or int8 of shape {(rows, k)}, got {self.values.dtype} {tuple(self.values.shape)}")
        check_scales(self.scales, self.values, rows, where)
        if self.indices.dtype != torch.uint8 or tuple(self.indices.shape) != (rows, nbytes):
            raise ModelError(
                f"{where}: indices must be uint8 of shape {(rows, nbytes)}, got {self.indices.dtype} {tuple(self.indices.shape)}"
            )
        step = max(1, _VALIDATE_CHUNK // max(1, k))  # rows per chunk: bounded temporaries on large layers
        for r in range(0, rows, step):
            idx = self.indices[r:r + step]  # (chunk, nbytes)
            pos = _unpack_indices(idx, k, index_bits(m)).reshape(-1, cols // m, n)  # (chunk, G, n)
            if (pos >= m).any() or (n > 1 and (pos[..., 1:] <= pos[..., :-1]).any()):
                raise ModelError(f"{where}: stored positions are out of range or not strictly ascending; the checkpoint is corrupt")
            if bool(unpack_bits(idx[:, k * index_bits(m) // 8:], 8 * (nbytes - k * index_bits(m) // 8))
                    [:, k * index_bits(m) % 8:].any()):
                raise ModelError(f"{where}: padding bits of the index rows are set; the checkpoint is corrupt")

    @classmethod
    def from_dense(cls, w: torch.Tensor, pattern: "Pattern | str", mask: torch.Tensor | None = None, *,
                   values_dtype: torch.dtype | None = None, scales: torch.Tensor | None = None) -> "NMWeight":
        """Compress ``w`` (rows, cols); ``mask`` (bool, True = keep) defaults to ``w != 0``.

        ``values_dtype=torch.int8`` quantizes the kept values with one scale per row, or on the
        grid of ``scales`` (float32 (rows,)) when given (:func:`~sparseforge.formats.quantized.quantize_rows`).

        Raises :class:`ConfigError` naming the first offending row and group when some group keeps
        more than ``n`` entries, or when ``cols`` is not a multiple of ``m``.
        """
        pattern = _as_nm(pattern)
        check_weight(w, mask)
        n, m = pattern.n, pattern.m
        rows, cols = w.shape
        if cols % m:
            raise ConfigError(f"{pattern} format needs cols divisible by {m}, got shape {rows}x{cols}; use BitmapWeight")
        keep = (w != 0) if mask is None else mask  # (rows, cols)
        groups = keep.reshape(rows * (cols // m), m)  # (rows*G, m)
        counts = groups.sum(dim=1)
        if (counts > n).any():
            first = int(torch.nonzero(counts > n)[0, 0])
            r, g = divmod(first, cols // m)
            raise ConfigError(
                f"weight violates {pattern}: row {r}, group {g} (columns {g * m}..{g * m + m - 1}) keeps "
                f"{int(counts[first])} > {n} entries; prune it to {pattern} first or use BitmapWeight"
            )
        # kept entries score 1, unused 0; ties keep the lower position, so short groups are
        # filled with their lowest unused positions
        chosen = topk_mask(groups.to(torch.float32), n)  # (rows*G, m), exactly n per group
        if values_dtype == torch.int8:
            kept, scales = quantize_rows(w, keep, scales)  # (rows, cols) int8, 0 where pruned; (rows,) float32
        elif scales is not None:
            raise ConfigError("scales= needs values_dtype=torch.int8")
        else:
            kept = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))  # (rows, cols)
        values = kept.reshape(rows * (cols // m), m)[chosen].reshape(rows, cols // m * n)
        pos = torch.arange(m, device=w.device).expand(rows * (cols // m), m)[chosen]  # ascending per group
        indices = _pack_indices(pos.reshape(rows, cols // m * n), index_bits(m))
        return cls((rows, cols), pattern, hugepage_copy(values.contiguous()), hugepage_backed(indices.contiguous()), scales)

    @classmethod
    def concat_rows(cls, parts: "list[NMWeight]") -> "NMWeight":
        """The rows of ``parts`` (one N:M pattern) stacked in order (:mod:`sparseforge.formats.concat`):
        values and index rows appended (each row's index stream is padded to whole bytes, so rows never
        share a byte), int8 scales concatenated.

        Example:
            >>> w = torch.tensor([[0., 1., 0., 2.]])
            >>> a = NMWeight.from_dense(w, "2:4")
            >>> NMWeight.concat_rows([a, a]).indices.tolist()
            [[13], [13]]
        """
        cols, _ = check_row_parts(parts, cls)
        patterns = {p.pattern for p in parts}
        if len(patterns) > 1:
            raise ConfigError(f"concat_rows joins one N:M pattern, got {', '.join(sorted(map(str, patterns)))}")
        values = hugepage_cat([p.values for p in parts])  # (sum rows, G*n)
        indices = hugepage_cat([p.indices for p in parts])  # (sum rows, ceil(G*n*b/8))
        return assemble(cls, shape=(values.shape[0], cols), pattern=parts[0].pattern, values=values, indices=indices,
                        scales=cat_scales(parts))

    def dequantized_values(self) -> torch.Tensor:
        """The values as float32 ``scales[r] * q`` (int8), or as stored (float); (rows, G*n)."""
        return self.values if self.scales is None else self.values.float() * self.scales[:, None]

    def positions(self) -> torch.Tensor:
        """int64 (rows, G*n): position within its group of every stored value."""
        k = self.shape[1] // self.pattern.m * self.pattern.n
        return _unpack_indices(self.indices, k, index_bits(self.pattern.m))

    def to_dense(self) -> torch.Tensor:
        """Dense (rows, cols) weight: stored entries bit-exact, all others ``+0.0``."""
        rows, cols = self.shape
        n, m = self.pattern.n, self.pattern.m
        values = self.dequantized_values()  # (rows, G*n)
        out = torch.zeros(rows, cols // m, m, dtype=values.dtype, device=values.device)  # (rows, G, m)
        pos = self.positions().reshape(rows, cols // m, n)  # (rows, G, n)
        out.scatter_(2, pos, values.reshape(rows, cols // m, n))
        return out.reshape(rows, cols)

    def mask(self) -> torch.Tensor:
        """Bool (rows, cols) of stored positions: exactly n per group, padding zeros included."""
        rows, cols = self.shape
        n, m = self.pattern.n, self.pattern.m
        out = torch.zeros(rows, cols // m, m, dtype=torch.bool, device=self.indices.device)
        out.scatter_(2, self.positions().reshape(rows, cols // m, n), True)
        return out.reshape(rows, cols)

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], shape: tuple[int, int], pattern: "Pattern | str", prefix: str = ""
    ) -> "NMWeight":
        """Rebuild from :meth:`state_dict` output plus the ``shape`` and ``pattern`` kept in the config."""
        missing = [k for k in ("nm_values", "nm_indices") if f"{prefix}{k}" not in state]
        if missing:
            raise ModelError(f"N:M weight {prefix!r} is missing tensor(s) {[prefix + k for k in missing]}")
        return cls(tuple(shape), _as_nm(pattern), state[f"{prefix}nm_values"], state[f"{prefix}nm_indices"],
                   state.get(f"{prefix}nm_scales"))


register(FormatSpec(
    "nm", NMWeight, rank=10, pattern_in_label=True, int8_values=True,
    build=lambda w, pattern, keep, **quant: NMWeight.from_dense(w, DEFAULT_NM if pattern is None else pattern, keep, **quant),
    load=lambda state, shape, pattern, prefix="": NMWeight.from_state_dict(state, shape, pattern, prefix=prefix),
    pattern_of=lambda obj: obj.pattern,
))
