"""Which format a pruned weight runs in without measuring it: the fixed, reproducible rule.

:func:`auto_format` is ``compress_(format="rule")`` and ``SparseLinear.from_linear(format="auto")``;
:func:`structured_format` maps a recorded ``Block`` / ``FanIn`` pattern first; :func:`load_format`
is the rule applied to a weight read from a checkpoint. For a pruned ``(out, in)`` weight ``w``:

1. a recorded N:M pattern that ``w`` obeys -> ``"nm"`` with that pattern;
2. sparsity >= :data:`CSR_FROM` (85%) -> ``"csr"`` (fewest bytes there; ``docs/kernels.md``: CSR keeps
   scaling with its bytes while the bitmap decode is compute bound from ~90%);
3. ``w`` obeys 2:4 -> ``"nm"`` 2:4;
4. otherwise ``"bitmap"``.

The measured choice (``format="auto"`` of ``compress_``) lives in :mod:`sparseforge.runtime.advise`.

Example:
    >>> import torch
    >>> from sparseforge.formats.rule import auto_format
    >>> auto_format(torch.tensor([[1., 0., 0., 2.], [0., 3., 4., 0.]]))
    ('nm', NM(n=2, m=4))
"""

from __future__ import annotations

from typing import Optional

import torch

from sparseforge.formats.bitmap import BitmapWeight
from sparseforge.formats.csr import CSRWeight
from sparseforge.masks import satisfies
from sparseforge.patterns import DEFAULT_NM, NM, Block, FanIn, Pattern, parse

__all__ = ["CSR_FROM", "LOAD_FORMATS", "auto_format", "structured_format", "load_format"]

CSR_FROM = 0.85  # step 2: CSR at or above this sparsity
LOAD_FORMATS = ("rule", "stored")  # what load_format accepts


def auto_format(w: torch.Tensor, pattern: "NM | str | None" = None) -> tuple[str, Optional[NM]]:
    """The rule (module doc) for a pruned (out, in) weight: ``(format, N:M pattern or None)``."""
    keep = w != 0  # (out, in)
    recorded = parse(pattern) if pattern is not None else None
    if isinstance(recorded, NM) and w.shape[1] % recorded.m == 0 and satisfies(keep, recorded):
        return "nm", recorded
    sparsity = 1.0 - float(keep.sum()) / max(1, keep.numel())
    if sparsity >= CSR_FROM:
        return "csr", None
    if w.shape[1] % DEFAULT_NM.m == 0 and satisfies(keep, DEFAULT_NM):
        return "nm", DEFAULT_NM
    return "bitmap", None


def structured_format(w: torch.Tensor, pattern: "Pattern | None") -> Optional[tuple[str, Optional[Block]]]:
    """A recorded Block / FanIn pattern the (out, in) weight obeys maps to ``("bsr", block)`` /
    ``("fanin", None)``; ``None`` otherwise."""
    keep = w != 0  # (out, in)
    if isinstance(pattern, Block) and satisfies(keep, pattern):
        return "bsr", pattern
    if isinstance(pattern, FanIn) and satisfies(keep, FanIn()):  # every row keeps the same count
        return "fanin", None
    return None


def load_format(obj, format: str):
    """The format a weight read from a checkpoint runs in: ``"stored"`` keeps ``obj``; ``"rule"`` turns
    bitmap weights of sparsity >= :data:`CSR_FROM` into CSR (step 2; int8 values and their scales are
    shared; N:M, BSR and fan-in stay as stored)."""
    if format == "rule" and isinstance(obj, BitmapWeight):
        rows, cols = obj.shape
        if 1.0 - obj.nnz / max(1, rows * cols) >= CSR_FROM:
            return CSRWeight.from_bitmap(obj)
    return obj
