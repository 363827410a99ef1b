"""The symmetric integer grid: scales, quantize, dequantize (pure tensor functions).

``scale = max|w| / qmax`` over a row (``group_size=None``, scale shape ``(out,)``) or over each group
of ``group_size`` consecutive columns of a row (scale shape ``(out, in // group_size)``); codes are
``clamp(round(w / scale), -qmax, qmax)`` as int8 and the dequantized weight is ``codes * scale`` in
float32. A row or group of zeros gets scale 0 and codes 0 (no division by zero). See
:mod:`sparseforge.quant.config` for the contract; GPTQ (Frantar et al. 2023) and SparseGPT section
3.4 use the same per-channel grid (the reference code's is asymmetric; this one is symmetric).

Example:
    >>> import torch
    >>> from sparseforge.quant.grid import compute_scale, dequantize, quantize
    >>> w = torch.tensor([[0.6, -1.0, 0.0, 0.3]])             # (out, in)
    >>> scale = compute_scale(w, bits=4)                       # (out,) = max|w| / 7
    >>> quantize(w, scale, bits=4).tolist()
    [[4, -7, 0, 2]]
    >>> dequantize(quantize(w, scale, bits=4), scale).abs().max().item() <= 1.0
    True
"""

from __future__ import annotations

import torch

from sparseforge.errors import DataError, NumericalError

__all__ = ["qmax_of", "compute_scale", "expand_scale", "round_to_grid", "quantize", "dequantize",
           "fake_quantize", "codes_of"]


def qmax_of(bits: int) -> int:
    """Largest code magnitude of a ``bits``-bit symmetric narrow grid (127 for 8, 7 for 4)."""
    return 2 ** (bits - 1) - 1


def _check_weight(w: torch.Tensor, group_size: int | None) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise DataError(f"quantization takes a 2-D floating-point weight (out_features, in_features), got {shape}")
    if group_size is not None and w.shape[1] % group_size:
        raise DataError(
            f"quantization group_size={group_size} does not divide in_features={w.shape[1]}; "
            "choose a group size that divides every quantized layer's input width"
        )
    if not torch.isfinite(w).all():
        raise NumericalError("cannot quantize a weight that contains NaN or inf; fix or reload the model first")


def compute_scale(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Float32 scales of ``w`` (out, in): ``(out,)``, or ``(out, in // group_size)`` with groups."""
    _check_weight(w, group_size)
    rows, cols = w.shape
    a = w.detach().float().abs()  # (out, in)
    amax = a.amax(dim=1) if group_size is None else a.reshape(rows, cols // group_size, group_size).amax(dim=2)
    return amax / qmax_of(bits)  # (out,) or (out, G)


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], group_size: int | None = None) -> torch.Tensor:
    """``scale`` broadcast to a weight of ``shape`` (out, in): ``(out, 1)`` or ``(out, in)``."""
    rows, cols = shape
    want = (rows,) if group_size is None else (rows, cols // group_size)
    if tuple(scale.shape) != want:
        raise DataError(f"scale has shape {tuple(scale.shape)} but a weight of shape {tuple(shape)} with "
                        f"group_size={group_size} needs {want}")
    if group_size is None:
        return scale.reshape(rows, 1)
    return scale.repeat_interleave(group_size, dim=1)  # (out, in)


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (float tensor) of ``x`` on the grid ``scale`` (any broadcastable shapes).

    Where ``scale`` is 0 the code is 0; a code of zero is always ``+0.0`` (never ``-0.0``)."""
    q = qmax_of(bits)
    positive = scale > 0
    safe = torch.where(positive, scale, torch.ones_like(scale))
    codes = torch.where(positive, torch.round(x / safe), torch.zeros_like(x)).clamp_(-q, q)
    return codes.add_(0.0)  # -0.0 + 0.0 = +0.0: products with the scale are then +0.0 too


def quantize(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Int8 codes (out, in) of ``w`` in ``[-qmax, qmax]`` (int4 codes are stored in int8 too)."""
    _check_weight(w, group_size)
    return round_to_grid(w.float(), expand_scale(scale.float(), tuple(w.shape), group_size), bits).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Float32 weight ``codes * scale`` (out, in): the exact products, zeros exactly +0.0."""
    if codes.dim() != 2 or codes.is_floating_point():
        raise DataError(f"dequantize takes 2-D integer codes (out, in), got {codes.dtype} {tuple(codes.shape)}")
    return codes.float() * expand_scale(scale.float(), tuple(codes.shape), group_size)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(dequantized weight (out, in) float32, scale)`` with the scale from ``w``."""
    scale = compute_scale(w, bits, group_size)
    return dequantize(quantize(w, scale, bits, group_size), scale, group_size), scale


def codes_of(weight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """The int8 codes of an already-quantized ``weight`` (out, in), checked to reproduce it exactly.

    This is how a storage format recovers the integers from a layer that follows the contract of
    :mod:`sparseforge.quant.config`. DataError if ``weight`` is not ``codes * scale`` bit for bit
    (scales that do not belong to these values).
    """
    codes = quantize(weight, scale, bits, group_size)  # (out, in) int8
    back = dequantize(codes, scale, group_size)
    if not torch.equal(back, weight.float()):
        bad = int((back != weight.float()).sum())
        raise DataError(
            f"{bad} weight(s) are not on the int{bits} grid of the given scales; the scales do not match the "
            "values (quantize the layer with sparseforge.quant.quantize_ or keep the scales it registered)"
        )
    return codes
