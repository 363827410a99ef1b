"""``sparseforge::label_select``: Double Sparsity's token choice over a 4-bit label cache.

Double Sparsity (Yang et al., "Post-Training Sparse Attention with Double Sparsity", 2024;
andy-yang-1/DoubleSparse) approximates a decode step's attention scores from a few "label" channels
of the keys, kept in a small side cache at 4 bits, and attends only over the tokens with the top
approximate scores. The native kernel (``csrc/label_select.h``, AVX-512 / AVX2 / scalar chosen at
run time, a scalar reference) computes the scores of every cached token and selects the top
``budget`` per (sequence, KV head). Layouts:

* ``q`` float32 ``(B, Hkv, C)``: the label channels of the query (summed over the GQA group);
* ``codes`` uint8 ``(B, Hkv, C, cap / 2)``: 4-bit codes, per channel in blocks of 32 tokens (16
  bytes): token ``32k + j`` (``j < 16``) in the low nibble of byte ``16k + j``, token ``32k + 16 + j``
  in its high nibble (:func:`pack_codes`);
* ``scales`` float32 ``(B, Hkv, cap)``: label value ``(code - 8) * scale`` (:func:`quantize_labels`:
  symmetric per token, ``scale = max |x| / 7``, codes 1..15);
* the scores ``(B, Hkv, n)`` float32, the chosen tokens ``(B, Hkv, budget)`` int32 ascending (a NaN
  score ranks first, as ``torch.topk``; ties go to the older token).

Example:
    >>> import torch
    >>> x = torch.tensor([[[[1.0, -2.0], [0.5, 0.5], [-1.0, 3.0]]]])  # (B, Hkv, T, C) label keys
    >>> codes, scales = quantize_labels(x)
    >>> packed, cap_scales = pack_codes(codes), pad_scales(scales)
    >>> label_select(torch.tensor([[[1.0, 1.0]]]), packed, cap_scales, 3, 2).tolist()  # scores -1, 1, 2
    [[[1, 2]]]
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.kernels import native
from sparseforge.ops._define import np_view

__all__ = ["label_scores", "label_scores_ref", "label_select", "gather_tokens", "quantize_labels", "pack_codes",
           "unpack_codes", "pad_scales", "BLOCK"]

BLOCK = 32  # tokens per packed block (16 bytes per channel)


def quantize_labels(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x (..., T, C)`` float -> codes uint8 ``(..., T, C)`` in 1..15 and scales float32 ``(..., T)``:
    symmetric 4-bit per token, ``x ~ (code - 8) * scale`` with ``scale = max_c |x| / 7`` (an all-zero
    token: scale 0, codes 8; a token holding NaN: scale NaN, so its score is NaN)."""
    x = x.float()
    scale = x.abs().amax(-1) / 7.0  # (..., T); NaN where x holds NaN
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    q = torch.nan_to_num(torch.round(x / safe), nan=0.0).clamp_(-7, 7)
    q = torch.where((scale > 0).unsqueeze(-1), q, torch.zeros_like(q))
    return (q + 8).to(torch.uint8), scale


def pack_codes(codes: Tensor) -> Tensor:
    """codes uint8 ``(..., T, C)`` (values < 16) -> the kernel's layout ``(..., C, cap / 2)``, ``cap``
    = ``T`` rounded up to 32, zero codes past ``T``."""
    *lead, T, C = codes.shape
    cap = -(-T // BLOCK) * BLOCK
    full = torch.zeros(*lead, C, cap, dtype=torch.uint8)
    full[..., :T] = codes.transpose(-1, -2)
    blocks = full.view(*lead, C, cap // BLOCK, 2, BLOCK // 2)  # [..., k, 0, j]: token 32k + j; [..., k, 1, j]: + 16
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(*lead, C, cap // 2)


def unpack_codes(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_codes`: ``(..., C, cap / 2)`` -> codes ``(..., cap, C)``."""
    *lead, C, half = packed.shape
    blocks = packed.view(*lead, C, half // (BLOCK // 2), 1, BLOCK // 2)
    both = torch.cat([blocks & 15, blocks >> 4], dim=-2)  # (..., C, blocks, 2, 16)
    return both.reshape(*lead, C, 2 * half).transpose(-1, -2)


def pad_scales(scales: Tensor) -> Tensor:
    """scales ``(..., T)`` -> float32 ``(..., cap)``, zero past ``T`` (``cap``: ``T`` rounded up to 32)."""
    T = scales.shape[-1]
    cap = -(-T // BLOCK) * BLOCK
    out = torch.zeros(*scales.shape[:-1], cap, dtype=torch.float32)
    out[..., :T] = scales
    return out


def _check(q: Tensor, codes: Tensor, scales: Tensor, n: int) -> None:
    for name, t in (("q", q), ("codes", codes), ("scales", scales)):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise DataError(f"{name} must be a contiguous CPU tensor")
    if q.dtype != torch.float32 or q.dim() != 3:
        raise DataError(f"q must be float32 (B, Hkv, C), got {q.dtype} {tuple(q.shape)}")
    if codes.dtype != torch.uint8 or codes.dim() != 4 or scales.dtype != torch.float32 or scales.dim() != 3:
        raise DataError(f"codes must be uint8 (B, Hkv, C, cap / 2) and scales float32 (B, Hkv, cap), got {codes.dtype} "
                        f"{tuple(codes.shape)} and {scales.dtype} {tuple(scales.shape)}")
    if not 0 <= n <= scales.shape[-1]:
        raise DataError(f"n ({n}) must be in [0, the cache capacity {scales.shape[-1]}]")


def _run(fn_name: str, q: Tensor, codes: Tensor, scales: Tensor, n: int, *extra):
    try:
        getattr(native(), fn_name)(np_view(q), np_view(codes), np_view(scales), int(n), *extra)
    except SparseforgeError:
        raise
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _scores(fn_name: str, q: Tensor, codes: Tensor, scales: Tensor, n: int) -> Tensor:
    _check(q, codes, scales, n)
    out = torch.empty(q.shape[0], q.shape[1], n, dtype=torch.float32)
    _run(fn_name, q, codes, scales, n, out.numpy())
    return out


@torch.library.custom_op("sparseforge::label_scores", mutates_args=())
def label_scores(q: Tensor, codes: Tensor, scales: Tensor, n: int) -> Tensor:
    """float32 ``(B, Hkv, n)``: ``scale_t * sum_c q_c (code_tc - 8)`` for every cached token."""
    return _scores("label_scores", q, codes, scales, n)


@label_scores.register_fake
def _(q, codes, scales, n):
    return q.new_empty(q.shape[0], q.shape[1], n)


def label_scores_ref(q: Tensor, codes: Tensor, scales: Tensor, n: int) -> Tensor:
    """The scalar reference kernel (test oracle) of :func:`label_scores`."""
    return _scores("label_scores_ref", q, codes, scales, n)


@torch.library.custom_op("sparseforge::label_select", mutates_args=())
def label_select(q: Tensor, codes: Tensor, scales: Tensor, n: int, budget: int) -> Tensor:
    """int32 ``(B, Hkv, budget)``: the ``budget`` tokens of ``[0, n)`` with the highest label scores,
    ascending (see the module doc)."""
    _check(q, codes, scales, n)
    if not 1 <= budget <= n:
        raise DataError(f"budget ({budget}) must be in [1, n = {n}]")
    scores = torch.empty(q.shape[0], q.shape[1], n, dtype=torch.float32)
    chosen = torch.empty(q.shape[0], q.shape[1], budget, dtype=torch.int32)
    _run("label_select", q, codes, scales, n, int(budget), scores.numpy(), chosen.numpy())
    return chosen


@label_select.register_fake
def _(q, codes, scales, n, budget):
    return q.new_empty(q.shape[0], q.shape[1], budget, dtype=torch.int32)


def gather_tokens(src: Tensor, idx: Tensor) -> Tensor:
    """``(B, Hkv, k, D)``: the rows ``idx (B, Hkv, k)`` (int32, in ``[0, cap)``) of ``src (B, Hkv, cap, D)``
    (float32 or bfloat16), copied by the native kernel (the chosen tokens' keys or values, contiguous)."""
    if src.dim() != 4 or idx.dim() != 3 or idx.dtype != torch.int32 or not src.is_contiguous() or not idx.is_contiguous():
        raise DataError(f"gather_tokens needs src (B, Hkv, cap, D) and idx int32 (B, Hkv, k), both contiguous; got "
                        f"{tuple(src.shape)} and {idx.dtype} {tuple(idx.shape)}")
    dst = src.new_empty(src.shape[0], src.shape[1], idx.shape[2], src.shape[3])
    try:
        native().gather_tokens(np_view(src), idx.numpy(), np_view(dst), True)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return dst

