"""``sparseforge::decode_attention``: one decode step of attention over the selected spans of a KV cache.

Native kernel ``csrc/decode_attention.h`` (AVX-512 / AVX2 / scalar chosen at run time, threads over
KV heads and chunks of tokens, online softmax). Shapes:

* ``q`` float32 ``(B, Hq, D)``: the new query of each sequence (one token);
* ``k``, ``v`` float32 or bfloat16 ``(B, Hkv, cap, D)``: the cache storage, tokens ``[0, n)`` valid,
  ``Hq`` a multiple of ``Hkv`` (grouped-query attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``);
* ``spans`` int32 ``(B, Hkv, S, 2)``: per KV head, ``[start, length)`` token spans, ascending and
  disjoint, length 0 for unused slots; the tokens they cover are the ones attended;
* returns float32 ``(B, Hq, D)``: ``softmax(scale * q . k_t) v_t`` over the selected tokens ``t``.

With one span ``[0, n)`` per head it equals ``torch.nn.functional.scaled_dot_product_attention``
(within float rounding). No autograd: decode attention is inference only.

:class:`BoundDecodeAttention` binds one layer's ``q``, cache and ``spans`` buffers once (checked once,
zero-copy views made once) for a decode loop that calls it every step with the new length: the
native engine's per-layer attention (:mod:`sparseforge.generation.engine`).

``sparseforge::quest_select(q, kmin, kmax, pages, keep)``: Quest's page choice per KV head, int32
``(B, Hkv, keep)`` ascending: the ``keep`` of the first ``pages`` pages with the largest bound
``sum_{g in group} sum_d max(q_gd kmax_d, q_gd kmin_d)`` (ties: the lower page); ``kmin``/``kmax``
``(B, Hkv, allocated pages, D)`` in the dtype of the cache.

:func:`attend` and :func:`select_pages` are what the attention calls: the registered ops under
``torch.compile``, the native kernels directly in eager mode (same checks, no custom-op dispatch).

Example:
    >>> import torch
    >>> from sparseforge.ops.decode_attention import decode_attention
    >>> q, k, v = torch.ones(1, 2, 4), torch.ones(1, 1, 8, 4), torch.arange(8.).view(1, 1, 8, 1).expand(1, 1, 8, 4)
    >>> spans = torch.tensor([[[[0, 8]]]], dtype=torch.int32)
    >>> decode_attention(q, k, v.contiguous(), spans, 8, 0.5)[0, 0].tolist()
    [3.5, 3.5, 3.5, 3.5]
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.kernels import native
from sparseforge.ops._define import np_view

__all__ = ["BoundDecodeAttention", "decode_attention", "decode_attention_lse", "decode_attention_ref", "merge_attention", "check_decode_args",
           "check_qkv_args",
           "quest_select", "quest_select_ref", "attend", "select_pages"]

KV_DTYPES = (torch.float32, torch.bfloat16)


def check_decode_args(q: Tensor, k: Tensor, v: Tensor, spans: Tensor, n: int) -> None:
    """Raises :class:`DataError` saying which argument of a decode-attention call is wrong."""
    check_qkv_args(q, k, v, n, (("spans", spans),))
    if spans.dtype != torch.int32 or spans.dim() != 4 or spans.shape[:2] != k.shape[:2] or spans.shape[3] != 2:
        raise DataError(f"spans must be int32 (B, Hkv, S, 2) = {(q.shape[0], k.shape[1], 'S', 2)}, got {spans.dtype} {tuple(spans.shape)}")


def check_qkv_args(q: Tensor, k: Tensor, v: Tensor, n: int, others: tuple = ()) -> None:
    """Raises :class:`DataError` for a bad query ``(B, Hq, D)``, cache ``(B, Hkv, cap, D)`` or ``n``
    (``others``: further ``(name, tensor)`` pairs that must be contiguous CPU tensors)."""
    for name, t in (("q", q), ("k", k), ("v", v), *others):
        if t.device.type != "cpu":
            raise DataError(f"{name} is on {t.device}; decode attention runs on the CPU")
        if not t.is_contiguous():
            raise DataError(f"{name} must be contiguous; call .contiguous() first")
    if q.dtype != torch.float32 or q.dim() != 3:
        raise DataError(f"q must be float32 (B, Hq, D), got {q.dtype} {tuple(q.shape)}")
    if k.dtype not in KV_DTYPES or k.dtype != v.dtype or k.dim() != 4 or k.shape != v.shape:
        raise DataError(
            f"k and v must both be float32 or bfloat16 (B, Hkv, cap, D) of one shape, got {k.dtype} {tuple(k.shape)} "
            f"and {v.dtype} {tuple(v.shape)}"
        )
    B, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1]:
        raise DataError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: need (B, Hkv, cap, D) with Hq % Hkv == 0")
    if not 1 <= n <= k.shape[2]:
        raise DataError(f"n={n} valid tokens must be in [1, {k.shape[2]}] (the cache capacity)")


def _call(fn_name: str, q: Tensor, k: Tensor, v: Tensor, spans: Tensor, n: int, scale: float, lse: bool = False):
    check_decode_args(q, k, v, spans, n)
    out = torch.empty(q.shape, dtype=torch.float32)
    lse_out = torch.empty(q.shape[:2], dtype=torch.float32) if lse else None
    try:
        getattr(native(), fn_name)(np_view(q), np_view(k), np_view(v), spans.numpy(), int(n), float(scale), out.numpy(),
                                   lse=None if lse_out is None else lse_out.numpy())
    except SparseforgeError:
        raise  # a bad SPARSEFORGE_ISA (ConfigError)
    except ValueError as exc:  # a span outside [0, n), out of order, or a head with nothing selected
        raise DataError(str(exc)) from None
    return (out, lse_out) if lse else out


@torch.library.custom_op("sparseforge::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, spans: Tensor, n: int, scale: float) -> Tensor:
    """``(B, Hq, D)`` attention of ``q`` over the tokens of ``k``/``v`` that ``spans`` select (see the module doc)."""
    return _call("decode_attention", q, k, v, spans, n, scale)


@decode_attention.register_fake
def _(q, k, v, spans, n, scale):
    if not isinstance(n, torch.SymInt):
        check_decode_args(q, k, v, spans, n)
    return q.new_empty(q.shape)


@torch.library.custom_op("sparseforge::decode_attention_lse", mutates_args=())
def decode_attention_lse(q: Tensor, k: Tensor, v: Tensor, spans: Tensor, n: int, scale: float) -> tuple[Tensor, Tensor]:
    """:func:`decode_attention` and float32 ``(B, Hq)`` ``log sum_t exp(scale * q . k_t)`` over the selected tokens,
    so attentions over disjoint token sets merge exactly (:func:`merge_attention`)."""
    return _call("decode_attention", q, k, v, spans, n, scale, lse=True)


@decode_attention_lse.register_fake
def _(q, k, v, spans, n, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2])


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """The attention over the union of two disjoint token sets from each set's output ``(B, Hq, D)`` and ``lse``."""
    m = torch.maximum(lse_a, lse_b)
    wa, wb = (lse_a - m).exp().unsqueeze(-1), (lse_b - m).exp().unsqueeze(-1)
    return (out_a * wa + out_b * wb) / (wa + wb)


def decode_attention_ref(q: Tensor, k: Tensor, v: Tensor, spans: Tensor, n: int, scale: float, lse: bool = False):
    """The scalar reference kernel (test oracle) on the same arguments (``lse=True``: also the lse)."""
    return _call("decode_attention_ref", q, k, v, spans, n, scale, lse=lse)


def _check_select(q: Tensor, kmin: Tensor, kmax: Tensor, pages: int, keep: int) -> None:
    for name, t in (("q", q), ("kmin", kmin), ("kmax", kmax)):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise DataError(f"{name} must be a contiguous CPU tensor")
    if q.dtype != torch.float32 or q.dim() != 3:
        raise DataError(f"q must be float32 (B, Hq, D), got {q.dtype} {tuple(q.shape)}")
    if kmin.dtype not in KV_DTYPES or kmin.dtype != kmax.dtype or kmin.dim() != 4 or kmin.shape != kmax.shape:
        raise DataError(f"kmin and kmax must be float32 or bfloat16 (B, Hkv, pages, D) of one shape and dtype")
    if kmin.shape[0] != q.shape[0] or kmin.shape[3] != q.shape[2] or q.shape[1] % kmin.shape[1]:
        raise DataError(f"kmin {tuple(kmin.shape)} does not fit q {tuple(q.shape)}")
    if not 0 <= keep <= pages <= kmin.shape[2]:
        raise DataError(f"need 0 <= keep ({keep}) <= pages ({pages}) <= allocated pages ({kmin.shape[2]})")


def _select(fn_name: str, q: Tensor, kmin: Tensor, kmax: Tensor, pages: int, keep: int, **kw) -> Tensor:
    _check_select(q, kmin, kmax, pages, keep)
    chosen = torch.empty(q.shape[0], kmin.shape[1], keep, dtype=torch.int32)
    getattr(native(), fn_name)(np_view(q), np_view(kmin), np_view(kmax), int(pages), chosen.numpy(), **kw)
    return chosen


@torch.library.custom_op("sparseforge::quest_select", mutates_args=())
def quest_select(q: Tensor, kmin: Tensor, kmax: Tensor, pages: int, keep: int) -> Tensor:
    """int32 ``(B, Hkv, keep)``: Quest's pages per KV head, ascending (see the module doc)."""
    return _select("quest_select", q, kmin, kmax, pages, keep)


@quest_select.register_fake
def _(q, kmin, kmax, pages, keep):
    return q.new_empty(q.shape[0], kmin.shape[1], keep, dtype=torch.int32)


def quest_select_ref(q: Tensor, kmin: Tensor, kmax: Tensor, pages: int, keep: int) -> Tensor:
    """The scalar reference of :func:`quest_select` (test oracle)."""
    return _select("quest_select_ref", q, kmin, kmax, pages, keep)


def attend(q: Tensor, k: Tensor, v: Tensor, spans: Tensor, n: int, scale: float, lse: bool = False):
    """:func:`decode_attention` (``lse=True``: :func:`decode_attention_lse`), without the custom-op
    dispatch in eager mode."""
    if torch.compiler.is_compiling():
        return (decode_attention_lse if lse else decode_attention)(q, k, v, spans, n, scale)
    return _call("decode_attention", q, k, v, spans, n, scale, lse=lse)


def select_pages(q: Tensor, kmin: Tensor, kmax: Tensor, pages: int, keep: int) -> Tensor:
    """:func:`quest_select`, without the custom-op dispatch in eager mode."""
    if torch.compiler.is_compiling():
        return quest_select(q, kmin, kmax, pages, keep)
    return _select("quest_select", q, kmin, kmax, pages, keep)


class BoundDecodeAttention:
    """:func:`decode_attention` over fixed buffers, for a decode loop: ``bound(n)`` fills ``out`` in place.

    ``q`` float32 ``(B, Hq, D)``, ``k``/``v`` ``(B, Hkv, cap, D)`` and ``spans`` int32 ``(B, Hkv, S, 2)`` are
    checked once here (:func:`check_decode_args`) and their zero-copy views kept, so a call costs the
    native kernel and one binding call. The caller writes the new query into ``q``, the new key/value
    into the caches and the current spans into ``spans`` (in place: the views see them) before each
    call, and keeps the spans within ``[0, n)`` (a span outside raises :class:`DataError`). Returns
    ``out``, float32 ``(B, Hq, D)``, which the next call overwrites.

    Example:
        >>> import torch
        >>> q, k = torch.ones(1, 2, 4), torch.ones(1, 1, 8, 4)
        >>> v = torch.arange(8.).view(1, 1, 8, 1).expand(1, 1, 8, 4).contiguous()
        >>> spans = torch.tensor([[[[0, 3]]]], dtype=torch.int32)
        >>> bound = BoundDecodeAttention(q, k, v, spans, 0.5)
        >>> bound(3)[0, 0].tolist()
        [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, spans: Tensor, scale: float) -> None:
        check_decode_args(q, k, v, spans, k.shape[2])
        self.out = torch.empty(q.shape, dtype=torch.float32)  # (B, Hq, D)
        self.capacity = k.shape[2]
        self._held = (q, k, v, spans)  # the views below share their memory
        self._args = (np_view(q), np_view(k), np_view(v), spans.numpy())
        self._out = self.out.numpy()
        self._scale = float(scale)
        self._kernel = native().decode_attention

    def __call__(self, n: int) -> Tensor:
        """Attention of the bound ``q`` over the tokens the bound ``spans`` select among the first ``n``."""
        if not 1 <= n <= self.capacity:
            raise DataError(f"n={n} valid tokens must be in [1, {self.capacity}] (the cache capacity)")
        q, k, v, spans = self._args
        try:
            self._kernel(q, k, v, spans, n, self._scale, self._out, lse=None)
        except SparseforgeError:
            raise
        except ValueError as exc:
            raise DataError(str(exc)) from None
        return self.out
