"""Memory for the KV cache: 2 MB aligned buffers advised for transparent huge pages, and rows given
back to the system.

:func:`huge_page_empty` makes the cache's buffers (:mod:`sparseforge.attention.cache`) and Mustafar's
compressed tokens; :func:`release_rows` frees the dense rows of tokens a policy keeps in another form
(``Mustafar(release_dense=True)``).

Example:
    >>> import torch
    >>> x = huge_page_empty((1, 1, 8192, 64), torch.float32).fill_(1.0)  # 2 MB, page aligned
    >>> release_rows(x, 4096)
    >>> float(x[0, 0, :4096].sum()), float(x[0, 0, 4096:].sum())
    (0.0, 262144.0)
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap

import torch
from torch import Tensor

from sparseforge.errors import ConfigError

__all__ = ["huge_page_empty", "release_rows"]

_HUGE_PAGE = 2 << 20


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``torch.empty(shape, dtype=dtype)`` in its own anonymous mapping, 2 MB aligned and advised for
    transparent huge pages (Linux ``MADV_HUGEPAGE``), for buffers of at least 2 MB; smaller ones, and
    systems without the advice, get ``torch.empty``.

    A decode step streams the whole KV cache (or jumps between Quest's pages): with 4 KB pages every
    4 KB costs a TLB miss and a page walk; with 2 MB pages a layer's cache needs a few dozen TLB
    entries. The advice is a hint: where transparent huge pages are off the buffer is an ordinary one.

    Example:
        >>> huge_page_empty((2, 3), torch.float32).shape
        torch.Size([2, 3])
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    # anonymous and private (mmap's default is shared, which transparent huge pages skip unless the
    # system enables them for shared memory too); freed with the last tensor using it
    region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    view = ctypes.c_char.from_buffer(region)
    offset = -ctypes.addressof(view) % _HUGE_PAGE
    del view  # release the export (the tensor keeps the mapping alive)
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def release_rows(store: Tensor, upto: int) -> None:
    """Give the memory of rows ``[0, upto)`` of every (batch, head) of ``store`` ``(B, H, cap, D)`` back to
    the system (``madvise(MADV_DONTNEED)`` on the whole OS pages inside each head's rows; the pages
    shared with row ``upto`` and beyond, or with another head, are kept). The freed rows read as zeros.

    Example:
        >>> x = huge_page_empty((1, 1, 8192, 64), torch.float32).fill_(1.0)  # 2 MB, page aligned
        >>> release_rows(x, 4096)
        >>> float(x[0, 0, :4096].sum()), float(x[0, 0, 4096:].sum())
        (0.0, 262144.0)
    """
    if not (hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap, "MADV_REMOVE")):
        raise ConfigError("releasing cache rows needs madvise(MADV_REMOVE / MADV_DONTNEED) (Linux); keep "
                          "release_dense=False here")
    B, H, cap, D = store.shape
    row, page = D * store.element_size(), mmap.PAGESIZE
    for bh in range(B * H):
        start = store.data_ptr() + bh * cap * row
        first, end = -(-start // page) * page, (start + upto * row) // page * page
        if end > first:
            _free_pages(first, end - first)


def _free_pages(address: int, length: int) -> None:
    """Free whole pages of this process's memory: MADV_REMOVE for a shared anonymous mapping (what
    ``mmap.mmap(-1, n)`` makes: dropping the page tables alone would keep its pages), MADV_DONTNEED
    for private memory (where MADV_REMOVE fails with EINVAL)."""
    args = (ctypes.c_void_p(address), ctypes.c_size_t(length))
    if _LIBC.madvise(*args, mmap.MADV_REMOVE) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL or _LIBC.madvise(*args, mmap.MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise on the KV cache's freed rows failed")


_LIBC = ctypes.CDLL(None, use_errno=True)
