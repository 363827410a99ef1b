"""float32-accurate matmul from three bf16 products on AMX (``bf16x3``).

``a @ b`` for float32 ``a`` (M, K) and ``b`` (K, N), computed as
``a_hi @ b_hi + a_lo @ b_hi + a_hi @ b_lo`` where every operand is split into bfloat16 parts
``x = x_hi + x_lo`` (``x_hi = bf16(x)``, ``x_lo = bf16(x - x_hi)``, round to nearest even) and all
three products accumulate in the same float32 AMX tiles (``csrc/gemm_bf16x3*``; one bf16 GEMM with
``K`` tripled: ``[a_hi | a_lo | a_hi] @ [b_hi; b_hi; b_lo]``). The dropped ``a_lo @ b_lo`` term and the
rounding of the ``lo`` parts leave a relative error of about ``2^-16`` per product: measured
4e-6 to 5e-6 (largest error over the largest output, against float64, K = 352 ... 2816), against
5e-7 to 8e-7 for float32 GEMM and 2.4e-3 for a single bf16 product. Method: Henry, Tang, Heinecke,
*Leveraging the bfloat16 Artificial Intelligence Datatype For Higher-Precision Computations*
(ARITH 2019).

Operands are split and packed once into tile-contiguous bf16 layouts (:func:`pack`), so a weight is
split once and reused while it does not change, and activations are split per call. Inputs are read
through their strides: a transposed view packs without a copy. Subnormal inputs read as zero and
parts below 2^-126 are flushed (AMX's bf16 arithmetic), values above bf16's largest (3.39e38)
round to inf. NaN propagates as in a float32 product; an infinite input gives inf or NaN where
float32 gives inf (a zero ``lo`` part of one operand times an infinite ``hi`` part of the other is
``0 * inf``), never a finite number.

Paths: ``"amx"`` (AMX-BF16; needs the CPU flag, Linux's tile permission and a build with
``-mamx-bf16``) and ``"scalar"`` (the same packed operands in plain C++, the reference of tests).
:func:`require_amx` raises :class:`~sparseforge.errors.ConfigError` where AMX is missing: the
``scalar`` path is a test oracle, far slower than float32 GEMM, never a silent fallback.

Example:
    >>> import torch
    >>> from sparseforge.ops.bf16x3 import pack, matmul
    >>> a, b = torch.randn(8, 64), torch.randn(64, 16)
    >>> y = matmul(pack(a), pack(b, as_b=True), path="scalar")  # (8, 16)
    >>> bool(((y - a @ b).abs().max() / (a @ b).abs().max()) < 1e-4)
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from sparseforge.errors import ConfigError, DataError
from sparseforge.kernels import native

__all__ = ["Packed", "pack", "packed_size", "matmul", "split", "amx_available", "require_amx", "TILE"]

TILE = 32  # packed sizes are rounded up to multiples of this


@functools.cache
def _lib():
    """The native module, looked up once (these calls sit inside per-expert loops)."""
    return native()


def _round(n: int) -> int:
    return (n + TILE - 1) // TILE * TILE


@dataclass(frozen=True)
class Packed:
    """hi / lo bf16 parts of a float32 (rows, cols) matrix in the kernel's tile layout (uint16 bits).

    ``as_b=False``: an ``a`` operand (M = rows, K = cols); ``as_b=True``: a ``b`` operand (K = rows, N = cols)."""

    hi: Tensor
    lo: Tensor
    rows: int
    cols: int
    as_b: bool


def amx_available() -> bool:
    """Whether this machine runs the AMX path (CPU flags, OS tile state and permission, build)."""
    return bool(_lib().bf16x3_path_supported("amx"))


def require_amx() -> None:
    """Raise :class:`ConfigError` unless the AMX path runs here."""
    if not amx_available():
        raise ConfigError(
            "matmul_precision='bf16x3' needs AMX-BF16 (an Intel Xeon of the Sapphire Rapids generation or later, "
            "Linux's tile permission and a build with -mamx-bf16); this machine lacks it: use matmul_precision='fp32'"
        )


def _check_f32(t: Tensor, name: str) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2:
        raise DataError(f"{name} must be a 2-D float32 CPU tensor, got {tuple(t.shape)} {t.dtype} on {t.device}")


def packed_size(rows: int, cols: int) -> int:
    """uint16 elements of each of a packed (rows, cols) matrix's two parts."""
    return _round(rows) * _round(cols)


def pack(x: Tensor, as_b: bool = False, scratch: tuple[Tensor, Tensor] | None = None) -> Packed:
    """Split ``x`` (rows, cols) float32 (any strides) into packed hi / lo bf16 parts; ``scratch``: two
    uint16 tensors of at least :func:`packed_size` elements to pack into (reused memory: a fresh
    buffer costs a page fault per 4 KB, more than the packing itself)."""
    _check_f32(x, "x")
    rows, cols = x.shape
    n = packed_size(rows, cols)
    if scratch is not None:
        hi, lo = scratch[0][:n], scratch[1][:n]
    else:
        hi = torch.empty(n, dtype=torch.uint16)
        lo = torch.empty(n, dtype=torch.uint16)
    (_lib().bf16x3_pack_b if as_b else _lib().bf16x3_pack_a)(x.detach(), hi, lo)
    return Packed(hi, lo, rows, cols, as_b)


def matmul(a: Packed, b: Packed, out: Tensor | None = None, accumulate: bool = False, path: str = "",
           park_workers: bool = False) -> Tensor:
    """``a @ b`` (M, N) float32 from packed operands; into ``out`` (M, N) float32 with unit column
    stride when given (``accumulate=True``: ``out += a @ b``). ``path``: ``""`` (best), ``"amx"``, ``"scalar"``.
    ``park_workers``: the kernels' pool sleeps right after the product instead of polling ~0.2 ms for
    the next kernel call (see :mod:`sparseforge.ops.expert_ffn`)."""
    if a.as_b or not b.as_b:
        raise DataError("matmul takes an `a` operand packed with as_b=False and a `b` operand packed with as_b=True")
    if a.cols != b.rows:
        raise DataError(f"inner sizes differ: a is ({a.rows}, {a.cols}), b is ({b.rows}, {b.cols})")
    if out is None:
        if accumulate:
            raise DataError("accumulate=True needs out")
        out = torch.empty(a.rows, b.cols, dtype=torch.float32)
    elif tuple(out.shape) != (a.rows, b.cols) or out.dtype != torch.float32:
        raise DataError(f"out must be float32 ({a.rows}, {b.cols}), got {tuple(out.shape)} {out.dtype}")
    _lib().bf16x3_gemm(a.hi, a.lo, b.hi, b.lo, a.rows, b.cols, a.cols, out, accumulate, path, park_workers)
    return out


def split(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` bfloat16 tensors with ``x = hi + lo`` up to bf16 rounding of ``lo`` (``x`` float32 CPU)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise DataError(f"x must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    x = x.detach().contiguous()
    hi = torch.empty(x.shape, dtype=torch.uint16)
    lo = torch.empty(x.shape, dtype=torch.uint16)
    _lib().bf16x3_split(x, hi, lo)
    return hi.view(torch.bfloat16), lo.view(torch.bfloat16)
