"""SparseGPT: one-shot pruning with second-order (OBS) weight updates (Frantar & Alistarh, 2023).

"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (ICML 2023). For a
linear layer with inputs ``X`` (in, n) the method minimizes ``||W X - W' X||^2`` row by row.
With ``H = 2 X X^T / n`` (the Hessian of that loss, see :class:`~sparseforge.prune.methods.LayerStats`):

1. Dead inputs (``H_jj = 0``) get ``W[:, j] = 0`` and ``H_jj = 1``.
2. Dampening: ``H += dampening * mean(diag H) * I``. If a Cholesky factorization fails, the
   relative dampening is multiplied by 10 (up to :data:`MAX_DAMP_RETRIES` times) before a
   :class:`~sparseforge.errors.NumericalError` is raised; ``info["dampening"]`` is the value used.
3. ``U`` = upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), computed in float64 from one
   Cholesky factorization of the index-reversed ``H`` (no explicit inverse). Row ``j`` of
   ``U`` is row ``j`` of the inverse Hessian of the not-yet-processed columns ``j..in-1``,
   divided by the square root of its diagonal, so one factorization serves every OBS step.
4. Columns are processed left to right. Pruning ``w_j`` moves the error ``e = w_j / U_jj`` onto the
   remaining columns: ``W[:, j:] -= e * U[j, j:]``. Updates to later column blocks of
   ``blocksize`` columns are applied lazily, once per block.
5. Adaptive mask selection with score ``w_j^2 / U_jj^2`` on the *current* (already updated)
   weights, through :func:`~sparseforge.masks.mask_from_scores`:

   * Unstructured: at the start of each column block, on that block's scores (scope="layer").
     The per-block counts are chosen by cumulative rounding so that the layer as a whole prunes
     exactly ``num_pruned(sparsity, out * in)`` entries, as ``mask_from_scores`` on the layer would.
   * N:M: for every ``M`` consecutive columns, just before the first of them is processed
     (``blocksize`` must be a multiple of ``M``).
   * Block(h, w): at the start of each column block (``w`` must divide ``blocksize``), with the
     same cumulative rounding over tiles.
   * FanIn and Channel: the mask is chosen **once, up front**, from the full-matrix scores
     ``W^2 / diag(U)^2`` (a row's or a column block's budget cannot be split adaptively without
     breaking the pattern); the OBS updates then run with that fixed mask.

Joint sparsification and quantization (``quantize=QuantConfig(...)``, paper section 3.4): in the same
column pass every kept value is also rounded to the symmetric integer grid of
:mod:`sparseforge.quant.grid` (``q = round(w_j / s) * s``, pruned entries ``q = 0``), and the error
``(w_j - q) / U_jj`` (pruning and rounding together) is propagated exactly like the pruning error; the
mask is chosen adaptively in that same pass, on the weights the rounding has already moved. The
per-channel scales are ``max |w| / qmax`` of the result of a plain (unquantized) pass run first: the
reference code takes them from the dense weights, but the OBS updates grow the kept weights beyond
that range, and clipping them raised a layer's output error by up to 30% at int8 on correlated
inputs; the price is a second column pass (the Hessian factor is shared). With ``group_size`` each
group's scale is taken from the updated weights when the pass reaches the group's first column (as
GPTQ does), so ``group_size`` must divide ``blocksize``. The returned weight is exactly
``codes * scale``, pruned entries ``+0.0``, and ``info["weight_scale"]`` holds the float32 scales
(``(out,)`` or ``(out, in // group_size)``). With sparsity 0 this is GPTQ on the same grid as
round-to-nearest.

``info["error_estimate"]`` is the sum of the OBS losses ``sum (w_j - q_j)^2 / (2 U_jj^2)``, an
estimate of ``||W X - W' X||_F^2 / n`` under the dampened Hessian.

Example:
    >>> import torch
    >>> from sparseforge.prune.methods.sparsegpt import sparsegpt_prune
    >>> x = torch.randn(256, 8)                      # (tokens, in)
    >>> h = 2 * x.T @ x / x.shape[0]                 # (in, in)
    >>> w_new, mask, info = sparsegpt_prune(torch.randn(4, 8), h, "2:4", blocksize=4)
    >>> mask.sum().item(), info["dampening"]
    (16, 0.01)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparseforge.errors import ConfigError, DataError, NumericalError
from sparseforge.masks import mask_from_scores, num_pruned, resolve_sparsity
from sparseforge.patterns import NM, Block, Channel, FanIn, Pattern, Unstructured, check_fits, parse
from sparseforge.prune.methods.base import LayerStats, PruningMethod
from sparseforge.quant.config import QuantConfig
from sparseforge.quant.grid import compute_scale, round_to_grid

__all__ = ["sparsegpt_prune", "inverse_hessian_factor", "SparseGPTPruning", "SparseGPTOptions", "MAX_DAMP_RETRIES"]

MAX_DAMP_RETRIES = 3  # dampening tried: d, 10 d, 100 d, 1000 d


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor ``U`` (float64) of ``(H + damp * mean(diag H) * I)^-1``.

    Returns ``(U, relative dampening used, retries)``. ``hessian`` must already have no zero
    diagonal entries. Raises :class:`NumericalError` if it stays singular after the retries.

    Memory: at most three ``(in, in)`` float64 matrices live at once besides ``hessian`` (the
    damped, index-reversed copy, its Cholesky factor, and the triangular solve's result), which
    matters for wide layers (in=11008 is ~1 GB per matrix).
    """
    mean_diag = float(torch.diagonal(hessian).double().mean())
    rel = float(dampening)
    for retry in range(MAX_DAMP_RETRIES + 1):
        # With P the index reversal and P H P = L L^T: H^-1 = (P L^-1 P)^T (P L^-1 P), and
        # P L^-1 P is upper triangular with a positive diagonal, hence the factor U. This costs
        # one Cholesky and one triangular solve instead of forming H^-1 and factoring it again.
        work = hessian.flip(0, 1).to(torch.float64)  # (in, in) P H P, a fresh float64 copy
        work.diagonal().add_(rel * mean_diag)  # damping: P (H + cI) P = P H P + cI
        chol, info = torch.linalg.cholesky_ex(work)  # (in, in) lower
        if info.item() == 0:
            eye = work.zero_()
            eye.diagonal().fill_(1.0)  # reuse the buffer as the identity
            inverse = torch.linalg.solve_triangular(chol, eye, upper=False)  # (in, in) L^-1
            del chol, eye, work
            upper = inverse.flip(0, 1)  # (in, in) upper
            del inverse
            if torch.isfinite(upper).all():
                return upper, rel, retry
        rel *= 10.0
    raise NumericalError(
        f"the layer Hessian stays singular after dampening up to {rel / 10:g} x mean(diag H) "
        f"({MAX_DAMP_RETRIES} retries from dampening={dampening:g}); the calibration inputs are degenerate: "
        "use more or more varied calibration samples, or raise the SparseGPT 'dampening' option"
    )


def _select(scores: torch.Tensor, pattern: Pattern, pruned: int, groups: int) -> torch.Tensor:
    """Keep-mask pruning exactly ``pruned`` of ``groups`` entries (or tiles) via mask_from_scores."""
    if pruned >= groups:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask_from_scores(scores, pattern, pruned / groups, scope="layer")  # num_pruned(k/G, G) == k


def _check_blocksize(pattern: Pattern, blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ConfigError(f"sparsegpt blocksize must be a positive integer, got {blocksize!r}")
    if isinstance(pattern, NM) and blocksize % pattern.m:
        raise ConfigError(
            f"sparsegpt blocksize={blocksize} is not a multiple of M={pattern.m} of pattern {pattern}; "
            f"use e.g. blocksize={max(1, 128 // pattern.m) * pattern.m}"
        )
    if isinstance(pattern, Block) and blocksize % pattern.w:
        raise ConfigError(
            f"sparsegpt blocksize={blocksize} is not a multiple of the tile width {pattern.w} of pattern {pattern}; "
            f"use e.g. blocksize={max(1, 128 // pattern.w) * pattern.w}"
        )


def _check_quantize(quantize: "QuantConfig | None", blocksize: int, cols: int) -> None:
    if quantize is None:
        return
    if not isinstance(quantize, QuantConfig):
        raise ConfigError(f"sparsegpt quantize must be a QuantConfig or None, got {type(quantize).__name__}")
    group = quantize.group_size
    if group is not None and cols % group:
        raise ConfigError(f"quantization group_size={group} does not divide the layer's in_features={cols}")
    if group is not None and blocksize % group:
        raise ConfigError(
            f"joint quantization with group_size={group} needs a sparsegpt blocksize that is a multiple of it, "
            f"got blocksize={blocksize}; use e.g. blocksize={max(1, 128 // group) * group}"
        )


def _column_pass(
    w: torch.Tensor, upper: torch.Tensor, pattern: Pattern, sparsity: float, blocksize: int, mask: torch.Tensor,
    adaptive: bool, quantize: "QuantConfig | None" = None, scale: "torch.Tensor | None" = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One OBS pass over the columns of ``w`` (out, in), in place; returns ``(w, mask, losses (out,))``.

    ``adaptive``: choose the mask as the pass goes (else keep ``mask``). With ``quantize`` every kept
    value is rounded to the grid of ``scale`` ((out,) per channel; with groups, the scales are taken
    at each group's first column and returned in ``scale``'s place as ``(out, in // group)``).
    """
    rows, cols = w.shape
    diag_u = torch.diagonal(upper)  # (in,)
    losses = torch.zeros(rows, dtype=torch.float64, device=w.device)  # (out,)
    qgroup = None if quantize is None else quantize.group_size
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # (out, B)
        u1 = upper[i1:i2, i1:i2]  # (B, B)
        d1 = diag_u[i1:i2]  # (B,)
        err1 = torch.zeros_like(w1)  # (out, B)
        if adaptive and isinstance(pattern, Unstructured):
            pruned = num_pruned(sparsity, rows * i2) - num_pruned(sparsity, rows * i1)
            mask[:, i1:i2] = _select(w1.pow(2) / d1.pow(2), pattern, pruned, rows * (i2 - i1))
        elif adaptive and isinstance(pattern, Block):
            tile_rows, tw = rows // pattern.h, pattern.w
            pruned = num_pruned(sparsity, tile_rows * (i2 // tw)) - num_pruned(sparsity, tile_rows * (i1 // tw))
            mask[:, i1:i2] = _select(w1.pow(2) / d1.pow(2), pattern, pruned, tile_rows * (i2 - i1) // tw)
        m1 = mask[:, i1:i2]  # (out, B) view: N:M groups are filled in below
        for i in range(i2 - i1):
            if adaptive and isinstance(pattern, NM) and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                m1[:, group] = mask_from_scores(w1[:, group].pow(2) / d1[group].pow(2), pattern)
            col = w1[:, i]  # (out,)
            q = torch.where(m1[:, i], col, torch.zeros_like(col))
            if quantize is not None:
                if qgroup is not None and (i1 + i) % qgroup == 0:
                    scale[:, (i1 + i) // qgroup] = w1[:, i:i + qgroup].abs().amax(dim=1) / quantize.qmax
                s = scale if qgroup is None else scale[:, (i1 + i) // qgroup]  # (out,)
                q = round_to_grid(q, s, quantize.bits) * s  # exact codes * scale, pruned entries 0
            e = (col - q) / d1[i]  # (out,)
            losses += e.double().pow(2) / 2
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)  # (out, B - i)
            w1[:, i] = q  # exact zeros / exact (quantized) kept values
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]  # lazy update of the later blocks, (out, in - i2)
    return w, mask, losses


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: "Pattern | str",
    sparsity: float | None = None,
    *,
    blocksize: int = 128,
    dampening: float = 0.01,
    quantize: "QuantConfig | None" = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Prune ``weight`` (out, in) with OBS updates; see the module doc for the algorithm.

    ``hessian`` (in, in) is ``2 X X^T / n``. Returns ``(new_weight, keep_mask, info)``; the new
    weight is float32 and exactly zero where the mask is False. ``weight`` is not modified.
    ``quantize`` (its ``bits`` and ``group_size``) turns on the joint mode: the new weight is then
    also on the integer grid and ``info["weight_scale"]`` holds the scales.
    """
    pattern = parse(pattern)
    rows, cols = weight.shape
    check_fits(pattern, (rows, cols))
    sparsity = resolve_sparsity(pattern, sparsity, cols)
    _check_blocksize(pattern, blocksize)
    _check_quantize(quantize, blocksize, cols)
    if isinstance(dampening, bool) or not isinstance(dampening, (int, float)) or not dampening > 0:
        raise ConfigError(f"sparsegpt dampening must be a positive number (default 0.01), got {dampening!r}")
    if tuple(hessian.shape) != (cols, cols):
        raise DataError(f"Hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols}) for weight {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise NumericalError("sparsegpt: the weight contains NaN or inf; the model is broken before pruning")
    if not torch.isfinite(hessian).all():
        raise NumericalError("sparsegpt: the Hessian contains NaN or inf; check the calibration activations")

    w = weight.detach().float().clone()  # (out, in)
    dead = torch.diagonal(hessian) == 0  # (in,) inputs that were always zero
    h = hessian.detach().to(w.device)
    if dead.any():
        h = h.clone()  # (in, in) the caller's Hessian stays untouched
        h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    upper64, damp_used, retries = inverse_hessian_factor(h, dampening)
    del h
    upper = upper64.to(w.dtype)  # (in, in)
    del upper64
    diag_u = torch.diagonal(upper)  # (in,)

    fixed = isinstance(pattern, (FanIn, Channel))
    mask = torch.ones(rows, cols, dtype=torch.bool, device=w.device)  # (out, in)
    if fixed:
        mask = mask_from_scores(w.pow(2) / diag_u.pow(2).unsqueeze(0), pattern, sparsity)
    scale = None
    if quantize is not None:
        # an unquantized pass first: the range of its result sets the per-channel scales (the joint pass
        # chooses its mask again, adaptively, with the rounding in the loop)
        pruned_w, _, _ = _column_pass(w.clone(), upper, pattern, sparsity, blocksize, mask.clone(), not fixed)
        if quantize.group_size is None:
            scale = compute_scale(pruned_w, quantize.bits)  # (out,)
        else:
            scale = w.new_zeros(rows, cols // quantize.group_size)  # (out, in // group), filled by the pass
        del pruned_w
    w, mask, losses = _column_pass(w, upper, pattern, sparsity, blocksize, mask, not fixed, quantize, scale)

    if not torch.isfinite(w).all():
        raise NumericalError("sparsegpt produced non-finite weights; raise the 'dampening' option")
    info = {
        "dampening": damp_used,
        "dampening_retries": retries,
        "dead_inputs": int(dead.sum().item()),
        "error_estimate": float(losses.sum().item()),
        "mask_selection": "fixed" if fixed else "adaptive",
        "blocksize": blocksize,
    }
    if quantize is not None:
        info["quantization"] = quantize.describe()
        info["weight_scale"] = scale
    return w, mask, info


@dataclass(frozen=True)
class SparseGPTOptions:
    blocksize: int = 128  # columns per lazy-update and adaptive-mask block (multiple of M for N:M)
    dampening: float = 0.01  # fraction of mean(diag H) added to the diagonal (the paper's percdamp)
    quantize: "QuantConfig | None" = None  # joint sparsify + quantize (a QuantConfig or its dict)

    def __post_init__(self) -> None:
        if isinstance(self.quantize, dict):
            try:
                object.__setattr__(self, "quantize", QuantConfig(**self.quantize))
            except TypeError as exc:
                raise ConfigError(f"sparsegpt option quantize: {exc}; keys are bits, group_size, method") from None
        if self.quantize is not None and not isinstance(self.quantize, QuantConfig):
            raise ConfigError(f"sparsegpt option quantize must be a mapping like {{bits: 8}}, got {self.quantize!r}")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ConfigError(f"sparsegpt option blocksize must be a positive integer, got {self.blocksize!r}")
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float)) or not self.dampening > 0:
            raise ConfigError(f"sparsegpt option dampening must be a positive number, got {self.dampening!r}")


class SparseGPTPruning(PruningMethod):
    """SparseGPT (Frantar & Alistarh, 2023): adaptive masks plus OBS reconstruction."""

    name = "sparsegpt"
    needs_calibration = True
    needs_hessian = True
    Options = SparseGPTOptions

    def _prune(self, weight: torch.Tensor, stats: LayerStats | None, pattern: Pattern, sparsity: float):
        assert stats is not None  # checked by PruningMethod.prune
        return sparsegpt_prune(
            weight, stats.hessian, pattern, sparsity,
            blocksize=self.options.blocksize, dampening=self.options.dampening, quantize=self.options.quantize,
        )
