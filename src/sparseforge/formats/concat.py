"""Row concatenation of sparse weights without densifying: ``concat_rows([w1, w2, ...])``.

Stacking layers that read the same input (q/k/v, gate/up: :mod:`sparseforge.generation.fuse`) along the
output dimension keeps every row as it was, so every row-major format concatenates by joining its
buffers: bitmaps and N:M values / indices append (their rows never share a byte), CSR / BSR row pointers
are offset by the entries before each part, column indices and values append, int8 row scales
concatenate. Each format class implements this as its ``concat_rows`` classmethod (the byte layouts are
in each format's module doc); :func:`concat_rows` here checks the parts and dispatches to it. The cost is
one copy of the stored buffers, where densifying and compressing again costs a pass over every weight.

A format class without ``concat_rows`` is joined by the generic fallback: densified, concatenated and
built again through the registry (same pattern, same value dtype and row scales); a
:class:`ConcatFallbackWarning` names the format every time that happens, so it never passes silently.

Every result satisfies ``concat_rows(ws).to_dense() == torch.cat([w.to_dense() for w in ws])`` bit for bit.

Example:
    >>> import torch
    >>> from sparseforge.formats import BitmapWeight
    >>> from sparseforge.formats.concat import concat_rows
    >>> a = BitmapWeight.from_dense(torch.tensor([[1., 0., 2.]]))
    >>> b = BitmapWeight.from_dense(torch.tensor([[0., 3., 0.], [4., 0., 0.]]))
    >>> joined = concat_rows([a, b])
    >>> joined.shape, joined.values.tolist()
    ((3, 3), [1.0, 2.0, 3.0, 4.0])
    >>> torch.equal(joined.to_dense(), torch.cat([a.to_dense(), b.to_dense()]))
    True
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Optional, Sequence

import torch

from sparseforge.errors import ConfigError
from sparseforge.formats.registry import spec_of

__all__ = ["concat_rows", "check_row_parts", "cat_scales", "offset_pointers", "assemble", "ConcatFallbackWarning"]

log = logging.getLogger(__name__)


class ConcatFallbackWarning(UserWarning):
    """A format without its own ``concat_rows`` was concatenated by densifying (module doc)."""


def check_row_parts(parts: Sequence[Any], cls: type) -> tuple[int, torch.dtype]:
    """``(cols, value dtype)`` of ``parts``, after checking that they can be stacked row-wise as ``cls``:
    at least one part, all of exactly class ``cls``, the same number of columns, the same value dtype, and
    int8 row scales on all of them or none. Raises :class:`ConfigError` naming the first mismatch."""
    parts = list(parts)
    if not parts:
        raise ConfigError("concat_rows needs at least one weight")
    name = cls.__name__
    for i, p in enumerate(parts):
        if type(p) is not cls:
            raise ConfigError(f"concat_rows joins weights of one format: part {i} is a {type(p).__name__}, "
                              f"not a {name}; convert it first")
    cols, dtype = parts[0].shape[1], parts[0].dtype
    for i, p in enumerate(parts[1:], 1):
        if p.shape[1] != cols:
            raise ConfigError(f"concat_rows stacks rows of the same width: part {i} has {p.shape[1]} columns, "
                              f"part 0 has {cols}")
        if p.dtype != dtype:
            raise ConfigError(f"concat_rows needs one value dtype: part {i} holds {p.dtype}, part 0 {dtype}; "
                              "convert the values first")
    return cols, dtype


def cat_scales(parts: Sequence[Any]) -> Optional[torch.Tensor]:
    """The parts' int8 row scales concatenated, float32 ``(sum rows,)``; ``None`` for float values."""
    scales = [getattr(p, "scales", None) for p in parts]
    if all(s is None for s in scales):
        return None
    return torch.cat(scales)  # check_row_parts: one dtype, so int8 parts all carry scales


def offset_pointers(pointers: Sequence[torch.Tensor], limit: int, what: str,
                    dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Row-pointer arrays ``(rows_i + 1,)`` (each from 0 to its part's entry count) as one ``dtype`` array
    ``(sum rows + 1,)``: every part's pointers shifted by the entries of the parts before it.
    Raises :class:`ConfigError` when the total passes ``limit`` (the pointers' range)."""
    ends = [int(p[-1]) for p in pointers]
    if sum(ends) > limit:
        raise ConfigError(f"concat_rows: {sum(ends)} {what} exceed the {limit} that the row pointers hold; "
                          "keep the layers separate")
    out, before = [torch.zeros(1, dtype=torch.int64)], 0
    for p, end in zip(pointers, ends):
        out.append(p[1:].to(torch.int64) + before)  # (rows_i,)
        before += end
    return torch.cat(out).to(dtype)


def assemble(cls: type, **fields: Any) -> Any:
    """A ``cls`` object (a frozen format dataclass) holding ``fields``, every dataclass field given, without
    running its load-time validation: for buffers joined from parts that were validated when they were
    built. Joining whole rows keeps every invariant a format checks (row pointers from 0 to the entry
    count, ascending columns within a row, N:M positions, padding bits), which the property tests
    confirm by validating every joined weight again (``tests/formats/test_concat_rows.py``); skipping it
    here saves a pass over every stored index of the fused layers of a model."""
    names = [f.name for f in dataclasses.fields(cls)]
    if sorted(names) != sorted(fields):
        raise ConfigError(f"assemble({cls.__name__}) needs exactly the fields {names}, got {sorted(fields)}")
    obj = object.__new__(cls)
    for name in names:
        object.__setattr__(obj, name, fields[name])
    return obj


def concat_rows(parts: Sequence[Any]) -> Any:
    """One weight whose rows are the rows of ``parts`` in order, in their common format (module doc).

    Raises:
        ConfigError: no parts, parts of different formats, widths, value dtypes or patterns (N:M
            pattern, block size, fan-in count).
    """
    parts = list(parts)
    if not parts:
        raise ConfigError("concat_rows needs at least one weight")
    cls = type(parts[0])
    own = getattr(cls, "concat_rows", None)
    if own is not None:
        return own(parts)
    return _densified(parts, cls)


def _densified(parts: list, cls: type) -> Any:
    """The generic fallback: densify, concatenate, build again (warned every time, module doc)."""
    check_row_parts(parts, cls)
    spec = spec_of(parts[0])
    patterns = {spec.pattern_of(p) for p in parts}
    if len(patterns) > 1:
        raise ConfigError(f"concat_rows: the {spec.name} parts record different patterns {sorted(map(str, patterns))}")
    message = (f"concat_rows: format {spec.name!r} ({cls.__name__}) has no concat_rows of its own; densifying "
               f"{sum(p.shape[0] for p in parts)}x{parts[0].shape[1]} weights and compressing them again")
    warnings.warn(message, ConcatFallbackWarning, stacklevel=3)
    log.warning(message)
    dense = torch.cat([p.to_dense() for p in parts])  # (sum rows, cols)
    keep = torch.cat([p.mask() for p in parts])  # (sum rows, cols): stored entries, explicit zeros included
    scales = cat_scales(parts)
    quant = {} if scales is None else {"values_dtype": torch.int8, "scales": scales}
    return spec.build(dense if scales is not None else dense.to(parts[0].dtype), patterns.pop(), keep, **quant)
