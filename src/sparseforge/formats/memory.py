"""Large format buffers in transparent huge pages (Linux).

The batch kernels walk the stored data of hundreds of rows at once (a row block of the lanes
kernels), each row its own stream; with 4 KB pages those streams miss the TLB often. Backing the
buffers of a format built by ``from_dense`` with 2 MB pages made the batch-64 kernels 5-10% faster on
the 8-layer benchmark stack (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` run, docs/benchmarks.md).
:func:`hugepage_backed` copies a tensor into a private anonymous mapping advised ``MADV_HUGEPAGE``;
where that is not possible (not Linux, transparent huge pages ``never``, small tensors) it returns
the tensor unchanged.

Example:
    >>> import torch
    >>> t = torch.arange(10.0)
    >>> hugepage_backed(t) is t  # small: unchanged
    True
"""

from __future__ import annotations

import functools
import math
import mmap
import sys

import torch

MIN_BYTES = 4 << 20  # two huge pages; smaller buffers stay where torch put them


@functools.lru_cache(maxsize=1)
def hugepages_available() -> bool:
    """Linux with transparent huge pages in ``always`` or ``madvise`` mode."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def _huge_empty(shape: tuple[int, ...], dtype: torch.dtype, numel: int) -> torch.Tensor:
    """An uninitialised tensor in a private anonymous mapping advised ``MADV_HUGEPAGE`` (``numel`` > 0)."""
    # private and anonymous: shared anonymous memory is shmem, which has its own (usually off) THP switch
    buf = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so the first write faults in 2 MB pages
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)  # keeps buf alive


def hugepage_backed(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a contiguous CPU tensor) copied into memory advised ``MADV_HUGEPAGE``, or ``t`` itself."""
    nbytes = t.numel() * t.element_size()
    if nbytes < MIN_BYTES or t.device.type != "cpu" or not t.is_contiguous() or not hugepages_available():
        return t
    return _huge_empty(tuple(t.shape), t.dtype, t.numel()).copy_(t)


def hugepage_cat(tensors: "list[torch.Tensor]") -> torch.Tensor:
    """``torch.cat(tensors)`` (along dim 0, one dtype, CPU), written straight into memory advised
    ``MADV_HUGEPAGE`` when :func:`hugepage_backed` would move the result there: one pass over the
    data instead of a concatenation and then a copy."""
    first = tensors[0]
    shape = (sum(int(t.shape[0]) for t in tensors),) + tuple(first.shape[1:])
    numel = math.prod(shape)
    if numel * first.element_size() < MIN_BYTES or any(t.device.type != "cpu" for t in tensors) \
            or not hugepages_available():
        return torch.cat(tensors)
    return torch.cat(tensors, out=_huge_empty(shape, first.dtype, numel))


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``: :func:`hugepage_backed` when that applies, else ``t.clone()``."""
    out = hugepage_backed(t)
    return out if out is not t else t.clone()
