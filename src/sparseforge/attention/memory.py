"""Memory for the KV cache: 2 MB aligned buffers advised for transparent huge pages, and rows given
back to the system.

:func:`huge_page_empty` (the formats' allocator, :mod:`sparseforge.formats.memory`) makes the cache's
buffers (:mod:`sparseforge.attention.cache`) and Mustafar's compressed tokens; :func:`release_rows` frees the dense rows of tokens a policy keeps in another form
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
import mmap

from torch import Tensor

from sparseforge.errors import ConfigError
from sparseforge.formats.memory import huge_page_empty

__all__ = ["huge_page_empty", "release_rows"]


def release_rows(store: Tensor, upto: int) -> None:
    """Give the memory of rows ``[0, upto)`` of every (batch, head) of ``store`` ``(B, H, cap, D)`` back to
    the system (``madvise(MADV_DONTNEED)`` on the whole OS pages inside each head's rows; the pages
    shared with row ``upto`` and beyond, or with another head, are kept). The freed rows read as zeros.

    Example:
        >>> import torch
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
