"""``sparseforge::quest_attention``: one Quest decode step (page scores, top-k pages, attention) in one native call.

Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024;
mit-han-lab/Quest) reads, per KV head, the newest page plus the ``read - 1`` complete pages with the
largest upper bound on ``q . k``. Native kernel ``csrc/quest_attention.h`` (AVX-512 / AVX2 / scalar
chosen at run time, a task per (batch, KV head) on the kernels' thread pool). Shapes:

* ``q`` float32 ``(B, Hq, D)``; ``k``, ``v`` float32 or bfloat16 ``(B, Hkv, cap, D)``, tokens ``[0, n)``;
* ``kmin``, ``kmax`` float32 or bfloat16 ``(B, Hkv, allocated pages, D)``: per page of ``page`` tokens
  and channel, the key minimum and maximum (:class:`~sparseforge.attention.cache.PagedLayer` keeps them);
* ``read``: pages read per KV head, the newest (partial) page included, ``1 <= read <= ceil(n / page)``;
* returns float32 ``(B, Hq, D)``.

The choice is :func:`~sparseforge.ops.decode_attention.quest_select` over the ``ceil(n / page) - 1``
complete pages (the bound summed over each KV head's query group; ties: the lower page; a NaN bound
ranks first) and the attention is :func:`~sparseforge.ops.decode_attention.decode_attention` over
the chosen pages and the newest one: the same pages and the same output (to float rounding) as
those two calls, in one call with no Python between them.

:func:`attend_quest` is what :class:`~sparseforge.attention.Quest` calls (the registered op under
``torch.compile``, the native kernel directly in eager mode); :func:`quest_attention_pages` also
returns the chosen pages (for tests and inspection).

Example:
    >>> import torch
    >>> from sparseforge.ops.quest_attention import quest_attention_pages
    >>> k = torch.zeros(1, 1, 48, 4); k[0, 0, 16:32] = 1.0     # page 1 holds the large keys
    >>> v = torch.arange(48.).view(1, 1, 48, 1).expand(1, 1, 48, 4).contiguous()
    >>> kmin = k.view(1, 1, 3, 16, 4).amin(3).contiguous(); kmax = k.view(1, 1, 3, 16, 4).amax(3).contiguous()
    >>> out, pages = quest_attention_pages(torch.ones(1, 2, 4), k, v, kmin, kmax, 40, 16, 2, 0.5)
    >>> pages[0, 0].tolist()                                   # page 1 chosen, the newest page [32, 40) read too
    [1]
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.kernels import native
from sparseforge.ops._define import np_view
from sparseforge.ops.decode_attention import KV_DTYPES, check_qkv_args

__all__ = ["quest_attention", "quest_attention_ref", "quest_attention_pages", "attend_quest", "check_quest_args"]


def check_quest_args(q: Tensor, k: Tensor, v: Tensor, kmin: Tensor, kmax: Tensor, n: int, page: int, read: int) -> None:
    """Raises :class:`DataError` saying which argument of a Quest step is wrong."""
    check_qkv_args(q, k, v, n, (("kmin", kmin), ("kmax", kmax)))
    if kmin.dtype not in KV_DTYPES or kmin.dtype != kmax.dtype or kmin.dim() != 4 or kmin.shape != kmax.shape:
        raise DataError("kmin and kmax must be float32 or bfloat16 (B, Hkv, pages, D) of one shape and dtype, got "
                        f"{kmin.dtype} {tuple(kmin.shape)} and {kmax.dtype} {tuple(kmax.shape)}")
    if kmin.shape[:2] != k.shape[:2] or kmin.shape[3] != k.shape[3]:
        raise DataError(f"kmin {tuple(kmin.shape)} does not fit k {tuple(k.shape)}: need (B, Hkv, pages, D)")
    if not isinstance(page, int) or page < 1:
        raise DataError(f"page must be a positive number of tokens, got {page!r}")
    pages = -(-n // page)
    if pages > kmin.shape[2]:
        raise DataError(f"kmin holds {kmin.shape[2]} pages, fewer than the {pages} pages of n={n} tokens")
    if not 1 <= read <= pages:
        raise DataError(f"read={read} pages must be in [1, {pages}] (ceil(n / page)); a budget covering the context "
                        "is dense: use decode_attention")


def _call(fn_name: str, q: Tensor, k: Tensor, v: Tensor, kmin: Tensor, kmax: Tensor, n: int, page: int, read: int,
          scale: float, pages: bool = False):
    check_quest_args(q, k, v, kmin, kmax, n, page, read)
    out = torch.empty(q.shape, dtype=torch.float32)
    chosen = torch.empty(q.shape[0], k.shape[1], read - 1, dtype=torch.int32) if pages else None
    try:
        getattr(native(), fn_name)(np_view(q), np_view(k), np_view(v), np_view(kmin), np_view(kmax), int(n), int(page),
                                   int(read), float(scale), out.numpy(), lse=None,
                                   chosen=None if chosen is None else chosen.numpy())
    except SparseforgeError:
        raise  # a bad SPARSEFORGE_ISA (ConfigError)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return (out, chosen) if pages else out


@torch.library.custom_op("sparseforge::quest_attention", mutates_args=())
def quest_attention(q: Tensor, k: Tensor, v: Tensor, kmin: Tensor, kmax: Tensor, n: int, page: int, read: int,
                    scale: float) -> Tensor:
    """``(B, Hq, D)``: Quest's attention over the ``read`` pages it chooses per KV head (see the module doc)."""
    return _call("quest_attention", q, k, v, kmin, kmax, n, page, read, scale)


@quest_attention.register_fake
def _(q, k, v, kmin, kmax, n, page, read, scale):
    return q.new_empty(q.shape)


def quest_attention_ref(q: Tensor, k: Tensor, v: Tensor, kmin: Tensor, kmax: Tensor, n: int, page: int, read: int,
                        scale: float) -> tuple[Tensor, Tensor]:
    """The scalar reference (``quest_select_ref`` + ``decode_attention_ref``): ``(out, chosen pages)``."""
    return _call("quest_attention_ref", q, k, v, kmin, kmax, n, page, read, scale, pages=True)


def quest_attention_pages(q: Tensor, k: Tensor, v: Tensor, kmin: Tensor, kmax: Tensor, n: int, page: int, read: int,
                          scale: float) -> tuple[Tensor, Tensor]:
    """:func:`quest_attention` and the pages it chose, int32 ``(B, Hkv, read - 1)`` ascending."""
    return _call("quest_attention", q, k, v, kmin, kmax, n, page, read, scale, pages=True)


def attend_quest(q: Tensor, k: Tensor, v: Tensor, kmin: Tensor, kmax: Tensor, n: int, page: int, read: int,
                 scale: float) -> Tensor:
    """:func:`quest_attention`, without the custom-op dispatch in eager mode."""
    if torch.compiler.is_compiling():
        return quest_attention(q, k, v, kmin, kmax, n, page, read, scale)
    return _call("quest_attention", q, k, v, kmin, kmax, n, page, read, scale)
