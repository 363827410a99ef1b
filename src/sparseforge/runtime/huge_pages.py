"""Weight buffers on transparent huge pages (Linux THP), for kernels that read them in short scattered runs.

A batch-1 column-sparse walk (``sparseforge.activation.ColumnSparseLinear``) reads, per active input
channel, one run of 1-4 KB of kept values at the decode model's widths: nearly every run starts on a
4 KB page of its own, so each costs a TLB miss and a page walk. :func:`on_huge_pages` copies a tensor
into anonymous memory advised ``MADV_HUGEPAGE`` before it is first touched, aligned to 2 MB, so the
kernel backs it with 2 MB pages where THP is ``always`` or ``madvise`` (``never``, a non-Linux system,
a tensor under 2 MB or ``SPARSEFORGE_HUGE_PAGES=0``: the tensor itself is returned). The copy is an
ordinary CPU tensor (it keeps its memory alive; pickling, ``deepcopy`` and ``.to()`` give ordinary
copies).

Example:
    >>> import torch
    >>> from sparseforge.runtime.huge_pages import on_huge_pages
    >>> t = torch.arange(1 << 20, dtype=torch.float32)     # 4 MB
    >>> h = on_huge_pages(t)
    >>> torch.equal(h, t)
    True
"""

from __future__ import annotations

import mmap
import os

import torch
from torch import Tensor

__all__ = ["HUGE_PAGE_BYTES", "huge_pages_available", "on_huge_pages"]

HUGE_PAGE_BYTES = 2 << 20
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_available() -> bool:
    """Whether :func:`on_huge_pages` copies: Linux THP not ``never``, ``MADV_HUGEPAGE`` known, and
    ``SPARSEFORGE_HUGE_PAGES`` not ``0``."""
    if os.environ.get("SPARSEFORGE_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def on_huge_pages(t: Tensor) -> Tensor:
    """A copy of the contiguous CPU tensor ``t`` in 2 MB-aligned memory advised for huge pages (module doc), or
    ``t`` itself where that does not apply (smaller than 2 MB, not a contiguous CPU tensor, THP unavailable)."""
    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE_PAGE_BYTES or t.device.type != "cpu" or not t.is_contiguous() or t.requires_grad \
            or not huge_pages_available():
        return t
    size = (nbytes + 2 * HUGE_PAGE_BYTES - 1) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES  # room to align
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the faults then map 2 MB pages
    raw = torch.frombuffer(region, dtype=torch.uint8)  # (size,), holds the region alive
    start = (-raw.data_ptr()) % HUGE_PAGE_BYTES
    out = raw[start:start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out
