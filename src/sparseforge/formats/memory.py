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

import ctypes
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


HUGE_PAGE = 2 << 20


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype, min_bytes: int = HUGE_PAGE) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` in its own private anonymous mapping, 2 MB aligned and advised
    ``MADV_HUGEPAGE`` before the first touch, for buffers of at least ``min_bytes``; smaller ones, and
    systems without transparent huge pages, get ``torch.empty``.

    A kernel that streams a buffer with 4 KB pages pays a TLB miss and a page walk every 4 KB; with
    2 MB pages a whole layer needs a few dozen TLB entries. Used by the formats' buffers
    (:func:`hugepage_backed`) and the KV cache (:mod:`sparseforge.attention.memory`).

    Example:
        >>> huge_page_empty((2, 3), torch.float32).shape
        torch.Size([2, 3])
    """
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < max(min_bytes, 1) or not hugepages_available():
        return torch.empty(shape, dtype=dtype)
    # private and anonymous: shared anonymous memory is shmem, which has its own (usually off) THP switch
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    view = ctypes.c_char.from_buffer(region)
    offset = -ctypes.addressof(view) % HUGE_PAGE  # the first 2 MB boundary inside the mapping
    del view  # release the export (the tensor keeps the mapping alive)
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def hugepage_backed(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a contiguous CPU tensor) copied into memory advised ``MADV_HUGEPAGE``, or ``t`` itself."""
    nbytes = t.numel() * t.element_size()
    if nbytes < MIN_BYTES or t.device.type != "cpu" or not t.is_contiguous() or not hugepages_available():
        return t
    return huge_page_empty(tuple(t.shape), t.dtype, MIN_BYTES).copy_(t)


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
    return torch.cat(tensors, out=huge_page_empty(shape, first.dtype, MIN_BYTES))


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``: :func:`hugepage_backed` when that applies, else ``t.clone()``."""
    out = hugepage_backed(t)
    return out if out is not t else t.clone()
