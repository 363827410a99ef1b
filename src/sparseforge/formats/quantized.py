"""int8 values with one float32 scale per output row: the quantizer and the checks the formats share.

The bitmap and N:M formats (:mod:`sparseforge.formats.bitmap`, :mod:`sparseforge.formats.nm`) store
their kept values either as float (float32 / bfloat16) or as int8 ``q`` plus a float32 ``scales``
buffer of shape ``(rows,)``: the weight is ``W[r, j] = scales[r] * q[r, j]`` (symmetric, per output
channel, no zero point; the LLM.int8 / SmoothQuant "per-channel weight" scheme and the grid
SparseGPT's joint sparsify-and-quantize mode writes, Frantar & Alistarh 2023, "SparseGPT", §3.5).

* :func:`quantize_rows` rounds to nearest with ``scales[r] = max_j |w[r, j]| / 127`` over the kept
  entries, or checks that ``w`` lies on a caller's grid (``scales=``, e.g. the ``weight_scale``
  buffer that :mod:`sparseforge.quant` leaves on every quantized ``nn.Linear``).
* A row with no nonzero kept entry (all pruned) gets scale ``1.0``: its ``q`` are all 0, the
  product is exactly 0, and no division by zero ever happens. A caller's scale of 0 is accepted for
  such a row only (and stored as 1.0).
* :func:`check_scales` is the load-time check (a corrupt checkpoint is a :class:`ModelError`).

Example:
    >>> import torch
    >>> from sparseforge.formats.quantized import quantize_rows
    >>> w = torch.tensor([[0.5, 0.0, -1.0], [0.0, 0.0, 0.0]])
    >>> q, s = quantize_rows(w, w != 0)
    >>> q.tolist(), s.tolist()
    ([[64, 0, -127], [0, 0, 0]], [0.007874015718698502, 1.0])
"""

from __future__ import annotations

from typing import Optional

import torch

from sparseforge.errors import ConfigError, ModelError, NumericalError

__all__ = ["quantize_rows", "check_scales", "row_scales", "QMAX", "GRID_TOL"]

QMAX = 127  # symmetric int8: q in [-127, 127] (-128 is never written)
GRID_TOL = 1e-3  # |w / scale - round(w / scale)| allowed for a caller's scales


def quantize_rows(w: torch.Tensor, keep: torch.Tensor, scales: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: int8 ``q`` (rows, cols), 0 where ``keep`` is False, and float32 ``scales`` (rows,).

    Raises:
        NumericalError: a kept weight is NaN or infinite.
        ConfigError: ``scales`` has the wrong shape, is not finite, is negative, is 0 for a row with
            a nonzero weight, or ``w`` does not lie on its grid (``|w/s - round(w/s)| > 1e-3`` or
            ``|round(w/s)| > 127``).
    """
    rows = w.shape[0]
    kept = torch.where(keep, w.float(), torch.zeros((), dtype=torch.float32))  # (rows, cols)
    if not bool(torch.isfinite(kept).all()):
        r, c = (int(i) for i in torch.nonzero(~torch.isfinite(kept))[0])
        raise NumericalError(f"weight [{r}, {c}] is {float(kept[r, c])}; int8 quantization needs finite weights, "
                             "fix or re-prune the layer first")
    amax = kept.abs().amax(dim=1) if kept.numel() else torch.zeros(rows)  # (rows,)
    given = scales is not None
    if not given:
        scales = torch.where(amax > 0, amax / QMAX, torch.ones(()))
    else:
        scales = _caller_scales(scales, rows, amax)
    ratio = kept / scales[:, None]  # (rows, cols)
    q = torch.round(ratio)
    if given:
        off = (ratio - q).abs()
        bad = (off > GRID_TOL) | (q.abs() > QMAX)
        if bool(bad.any()):
            r, c = (int(i) for i in torch.nonzero(bad)[0])
            raise ConfigError(
                f"weight [{r}, {c}] = {float(kept[r, c]):.6g} is not on its row's int8 grid (scale {float(scales[r]):.6g}: "
                f"w / scale = {float(ratio[r, c]):.4f}); pass the scales the weights were quantized with, or none "
                "to quantize round-to-nearest"
            )
    return q.to(torch.int8), scales.contiguous()


def _caller_scales(scales: torch.Tensor, rows: int, amax: torch.Tensor) -> torch.Tensor:
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or tuple(scales.shape) != (rows,):
        got = f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ConfigError(f"scales must be a float tensor of shape ({rows},), one per output row, got {got}")
    scales = scales.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        r = int(torch.nonzero(~torch.isfinite(scales) | (scales < 0))[0, 0])
        raise ConfigError(f"scales[{r}] = {float(scales[r])}; every scale must be finite and > 0")
    zero = scales == 0
    if bool((zero & (amax > 0)).any()):
        r = int(torch.nonzero(zero & (amax > 0))[0, 0])
        raise ConfigError(f"scales[{r}] = 0 but row {r} keeps nonzero weights; every scale must be > 0")
    return torch.where(zero, torch.ones(()), scales)  # all-zero rows: scale 1.0 (module doc)


def check_scales(scales: Optional[torch.Tensor], values: torch.Tensor, rows: int, where: str) -> None:
    """Load-time check: int8 ``values`` need float32 ``scales`` (rows,), finite and > 0; float values none."""
    if values.dtype != torch.int8:
        if scales is not None:
            raise ModelError(f"{where}: {values.dtype} values take no scales (only int8 values do)")
        return
    if scales is None:
        raise ModelError(f"{where}: int8 values need float32 scales of shape ({rows},); the checkpoint is corrupt")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (rows,):
        raise ModelError(f"{where}: scales must be float32 of shape ({rows},), got {scales.dtype} {tuple(scales.shape)}")
    bad = ~torch.isfinite(scales) | (scales <= 0)
    if bool(bad.any()):
        r = int(torch.nonzero(bad)[0, 0])
        raise ModelError(f"{where}: scales[{r}] = {float(scales[r])} must be finite and > 0; the checkpoint is corrupt")


def row_scales(scales: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each row's scale repeated ``counts[r]`` times: the scale of every stored value, in row-major order."""
    return torch.repeat_interleave(scales, counts)
