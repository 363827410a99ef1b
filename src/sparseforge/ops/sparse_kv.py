"""Per-token pruned, compressed keys and values (Mustafar) and decode attention over them.

Format (one entry per token of one KV head, channels ``D``): exactly ``keep`` channels survive;
``bits (..., ceil(D / 64))`` int64 words mark them (bit ``d % 64`` of word ``d // 64``) and
``vals (..., keep)`` hold their values in channel order, in the cache's dtype. A token costs
``keep * elt + 8 * ceil(D / 64)`` bytes against ``D * elt`` dense: 92 of 256 bytes for float32,
D = 64 at Mustafar's 70% (``keep = 21``).

* :func:`compress_tokens` ``(x (B, H, T, D), keep) -> (vals, bits)``: the ``keep`` largest magnitudes
  of every token (Joo et al., "Mustafar: Promoting Unstructured Sparsity for KV Cache Pruning in
  LLM Inference", 2025; dhjoo98/mustafar ``dh_prune_key``; ties by ``topk``).
* ``sparseforge::sparse_kv_attention(q, kvals, kbits, vvals, vbits, n, scale, k=None, v=None, end=0)
  -> (out, lse)``: the native kernel (``csrc/decode_attention.h``, ``sparse_kv_attention``) over the
  compressed tokens ``[0, n)`` and, given the dense cache ``k``, ``v`` ``(B, Hkv, cap, D)``, its tokens
  ``[n, end)`` in the same softmax (Mustafar's recent window: one native call); ``lse`` merges the
  result with attention over other tokens (:func:`sparseforge.ops.decode_attention.merge_attention`).
  :func:`attend_compressed` is the same without the custom-op dispatch in eager mode.

Example:
    >>> import torch
    >>> vals, bits = compress_tokens(torch.tensor([[[[0.1, -3.0, 2.0, 0.5]]]]), keep=2)
    >>> vals.tolist(), bits.tolist()
    ([[[[-3.0, 2.0]]]], [[[[6]]]])
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.kernels import native
from sparseforge.ops._define import np_view

__all__ = ["compress_tokens", "sparse_kv_attention", "sparse_kv_attention_ref", "attend_compressed", "keep_for"]


def keep_for(sparsity: float, dim: int) -> int:
    """Channels a token keeps, as the reference: the magnitudes at or above the ``int(sparsity * D)``-th
    smallest, ``D - int(sparsity * D) + 1`` (at most ``D``)."""
    return min(dim, dim - int(sparsity * dim) + 1)


def compress_tokens(x: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """``(vals (B, H, T, keep), bits (B, H, T, ceil(D / 64)) int64)`` of the ``keep`` largest magnitudes per token."""
    D = x.shape[-1]
    if not 1 <= keep <= D:
        raise DataError(f"keep={keep} must be in [1, {D}] (the head dimension)")
    idx = x.abs().topk(keep, dim=-1).indices.sort(dim=-1).values  # (B, H, T, keep) ascending channels
    vals = x.gather(-1, idx).contiguous()
    words = torch.zeros(*x.shape[:-1], (D + 63) // 64, dtype=torch.int64)
    words.scatter_add_(-1, idx // 64, torch.ones_like(idx) << (idx % 64))
    return vals, words


def _check(q, kvals, kbits, vvals, vbits, n, k, v, end):
    for name, t in (("q", q), ("kvals", kvals), ("kbits", kbits), ("vvals", vvals), ("vbits", vbits)):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise DataError(f"{name} must be a contiguous CPU tensor")
    if q.dtype != torch.float32 or q.dim() != 3:
        raise DataError(f"q must be float32 (B, Hq, D), got {q.dtype} {tuple(q.shape)}")
    if kvals.dtype not in (torch.float32, torch.bfloat16) or vvals.dtype != kvals.dtype or kbits.dtype != torch.int64 \
            or vbits.dtype != torch.int64 or kvals.dim() != 4 or kvals.shape != vvals.shape or kbits.shape != vbits.shape:
        raise DataError("kvals / vvals must be float32 or bfloat16 (B, Hkv, cap, keep) of one shape, kbits / vbits int64 "
                        "(B, Hkv, cap, ceil(D / 64)) of one shape")
    if not 1 <= n <= kvals.shape[2]:
        raise DataError(f"n={n} compressed tokens must be in [1, {kvals.shape[2]}]")
    if (k is None) != (v is None):
        raise DataError("give both k and v (the dense cache of the recent tokens) or neither")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if t.device.type != "cpu" or not t.is_contiguous() or t.dtype != kvals.dtype or t.dim() != 4:
                raise DataError(f"{name} must be a contiguous CPU (B, Hkv, cap, D) tensor of kvals' dtype {kvals.dtype}")
        if k.shape != v.shape or k.shape[:2] != kvals.shape[:2] or k.shape[3] != q.shape[2]:
            raise DataError(f"k and v {tuple(k.shape)} must both be (B, Hkv, cap, D) = {(*kvals.shape[:2], 'cap', q.shape[2])}")
        if not n <= end <= k.shape[2]:
            raise DataError(f"end={end}: the dense tokens [n, end) must lie in [{n}, {k.shape[2]}] (n compressed, cache capacity)")


def _call(fn_name, q, kvals, kbits, vvals, vbits, n, scale, k=None, v=None, end=0):
    _check(q, kvals, kbits, vvals, vbits, n, k, v, end)
    out = torch.empty(q.shape, dtype=torch.float32)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    dense = {} if k is None else {"k": np_view(k), "v": np_view(v), "recent_start": int(n), "recent_end": int(end)}
    try:
        getattr(native(), fn_name)(np_view(q), np_view(kvals), kbits.numpy(), np_view(vvals), vbits.numpy(), int(n),
                                   float(scale), out.numpy(), lse.numpy(), **dense)
    except SparseforgeError:
        raise
    except ValueError as exc:  # shapes that do not fit, a bitmap without exactly keep bits
        raise DataError(str(exc)) from None
    return out, lse


@torch.library.custom_op("sparseforge::sparse_kv_attention", mutates_args=())
def sparse_kv_attention(q: Tensor, kvals: Tensor, kbits: Tensor, vvals: Tensor, vbits: Tensor, n: int,
                        scale: float, k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                        end: int = 0) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, D), lse (B, Hq))`` of ``q`` over the first ``n`` compressed tokens and, given ``k`` and
    ``v``, their dense tokens ``[n, end)`` (see the module doc)."""
    return _call("sparse_kv_attention", q, kvals, kbits, vvals, vbits, n, scale, k, v, end)


@sparse_kv_attention.register_fake
def _(q, kvals, kbits, vvals, vbits, n, scale, k=None, v=None, end=0):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2])


def attend_compressed(q: Tensor, kvals: Tensor, kbits: Tensor, vvals: Tensor, vbits: Tensor, n: int, scale: float,
                      k: Optional[Tensor] = None, v: Optional[Tensor] = None, end: int = 0) -> tuple[Tensor, Tensor]:
    """:func:`sparse_kv_attention` without the custom-op dispatch in eager mode (a decode step's call)."""
    if torch.compiler.is_compiling():
        return sparse_kv_attention(q, kvals, kbits, vvals, vbits, n, scale, k, v, end)
    return _call("sparse_kv_attention", q, kvals, kbits, vvals, vbits, n, scale, k, v, end)


def sparse_kv_attention_ref(q, kvals, kbits, vvals, vbits, n, scale, k=None, v=None, end=0):
    """The scalar reference (test oracle) on the same arguments."""
    return _call("sparse_kv_attention_ref", q, kvals, kbits, vvals, vbits, n, scale, k, v, end)
