"""The one place that turns importance scores into a sparsity mask.

Every pruning method (magnitude, Wanda, SparseGPT, RigL, ...) produces *scores*; this module
selects what to keep for any :mod:`~sparseforge.patterns` pattern. No other module in sparseforge
writes its own top-k, N:M or block selection.

Conventions
-----------
* ``scores`` and masks are 2-D ``(out_features, in_features)``; a mask is ``torch.bool`` with
  ``True`` = keep.
* Higher score = more important = kept first.
* **How many are pruned.** In a selection group of ``L`` entries, ``round_half_up(sparsity * L)``
  entries are pruned, so achieved sparsity equals the target exactly whenever ``sparsity * L`` is
  an integer (ties in the scores included).
* **Tie-breaking.** Among equal scores the entry with the *lower index* in row-major order within
  its group is kept. The selection uses a stable descending sort, so the result does not depend on
  threads or on the top-k implementation.
* **Scope.** ``scope="layer"`` compares all entries of the layer (magnitude pruning);
  ``scope="row"`` compares entries within each output row (Wanda). N:M groups, fan-in rows and
  channels define their own groups and ignore ``scope``.

Example:
    >>> import torch
    >>> from sparseforge.masks import mask_from_scores
    >>> from sparseforge.patterns import NM
    >>> w = torch.tensor([[4., -1., 3., 2.]])
    >>> mask_from_scores(w.abs(), NM(2, 4)).tolist()
    [[True, False, True, False]]
"""

from __future__ import annotations

import itertools
import math

import torch

from sparseforge.errors import ConfigError, NumericalError
from sparseforge.patterns import NM, Block, Channel, FanIn, Pattern, Unstructured, check_fits, parse

__all__ = ["mask_from_scores", "resolve_sparsity", "satisfies", "num_pruned", "topk_mask", "transposable_mask"]


def num_pruned(sparsity: float, group_size: int) -> int:
    """Entries pruned in a group of ``group_size`` at ``sparsity`` (round half up)."""
    return int(math.floor(sparsity * group_size + 0.5))


# rows at least this long select by k-th value (O(L)) instead of a stable sort (O(L log L)); a whole
# 4096x11008 layer under a "layer"-scope unstructured mask is one row of 45M scores
SELECT_MIN_LENGTH = 4096


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest scores of every row of ``scores`` (G, L); ties keep the lower index.

    Returns a bool tensor shaped like ``scores``. Long rows of finite scores take a selection (the
    k-th largest value per row, everything above it, then the lowest-index ties at it): the same
    mask as the stable sort, without sorting.

    >>> topk_mask(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), 2)
    tensor([[False,  True,  True, False]])
    """
    groups, length = scores.shape
    mask = torch.zeros(groups, length, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return mask
    if k >= length:
        return mask.fill_(True)
    if length >= SELECT_MIN_LENGTH and bool(torch.isfinite(scores).all()):
        return _select_topk(scores, k)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (G, L)
    mask.scatter_(1, order[:, :k], True)
    return mask


def _select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """topk_mask for finite scores (G, L) and 0 < k < L, by the k-th largest value of each row."""
    length = scores.shape[1]
    kth = torch.kthvalue(scores, length - k + 1, dim=1, keepdim=True).values  # (G, 1): k-th largest
    above = scores > kth  # (G, L): fewer than k per row
    ties_needed = k - above.sum(dim=1, keepdim=True, dtype=torch.int64)  # (G, 1), >= 1
    at = scores == kth
    return above | (at & (at.cumsum(dim=1, dtype=torch.int32) <= ties_needed))


def resolve_sparsity(pattern: Pattern, sparsity: float | None, in_features: int | None = None) -> float:
    """Sparsity a pattern implies or accepts; raises :class:`ConfigError` on a conflict.

    N:M and ``FanIn(k)`` fix the sparsity themselves; ``sparsity`` may then be ``None`` or must
    agree with it.
    """
    fixed = None
    if isinstance(pattern, NM):
        fixed = pattern.sparsity
    elif isinstance(pattern, FanIn) and pattern.k is not None and in_features is not None:
        fixed = 1.0 - pattern.k / in_features
    if sparsity is None:
        if fixed is None:
            raise ConfigError(f"pattern {pattern} needs a sparsity level in [0, 1), e.g. sparsity=0.5")
        return fixed
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r} (0.5 prunes half the weights)")
    if fixed is not None and isinstance(pattern, NM) and abs(fixed - sparsity) > 1e-9:
        raise ConfigError(
            f"pattern {pattern} fixes sparsity at {fixed:g} but sparsity={sparsity:g} was asked; "
            f"drop the sparsity or set it to {fixed:g}"
        )
    return float(sparsity)


def mask_from_scores(
    scores: torch.Tensor,
    pattern: "Pattern | str",
    sparsity: float | None = None,
    *,
    scope: str = "layer",
) -> torch.Tensor:
    """Keep-mask for ``scores`` (out, in) under ``pattern`` at ``sparsity``; see the module doc."""
    pattern = parse(pattern)
    if scores.dim() != 2:
        raise ConfigError(f"scores must be 2-D (out_features, in_features), got shape {tuple(scores.shape)}")
    if scope not in ("layer", "row"):
        raise ConfigError(f"scope must be 'layer' or 'row', got {scope!r}")
    check_fits(pattern, tuple(scores.shape))
    if not torch.isfinite(scores).all():
        raise NumericalError("pruning scores contain NaN or inf; check the weights and calibration activations")
    rows, cols = scores.shape
    sparsity = resolve_sparsity(pattern, sparsity, cols)
    scores = scores.float()

    if isinstance(pattern, Unstructured):
        groups = scores.reshape(1, -1) if scope == "layer" else scores  # (G, L)
        keep = groups.shape[1] - num_pruned(sparsity, groups.shape[1])
        return topk_mask(groups, keep).reshape(rows, cols)

    if isinstance(pattern, NM):
        groups = scores.reshape(-1, pattern.m)  # (rows * cols/m, m)
        return topk_mask(groups, pattern.n).reshape(rows, cols)

    if isinstance(pattern, FanIn):
        k = pattern.k if pattern.k is not None else cols - num_pruned(sparsity, cols)
        return topk_mask(scores, k)

    if isinstance(pattern, Channel):
        row_scores = scores.sum(dim=1).reshape(1, rows)  # (1, rows)
        keep_rows = topk_mask(row_scores, rows - num_pruned(sparsity, rows)).reshape(rows, 1)
        return keep_rows.expand(rows, cols).clone()

    if isinstance(pattern, Block):
        h, w = pattern.h, pattern.w
        tiles = scores.reshape(rows // h, h, cols // w, w).sum(dim=(1, 3))  # (R, C) tile scores
        tile_mask = mask_from_scores(tiles, Unstructured(), sparsity, scope=scope)  # (R, C)
        return tile_mask.repeat_interleave(h, 0).repeat_interleave(w, 1)

    raise ConfigError(f"unsupported pattern {pattern!r}")  # pragma: no cover


def satisfies(mask: torch.Tensor, pattern: "Pattern | str") -> bool:
    """Whether a keep-mask (or a weight's nonzero map) obeys ``pattern``.

    N:M: every group keeps at most N. ``FanIn(k)``: every row keeps at most k; ``FanIn()``: every row
    keeps the same number. Block: every tile is all kept or all pruned. Channel: every row is all
    kept or all pruned. Unstructured: always.
    """
    pattern = parse(pattern)
    mask = mask.bool()
    rows, cols = mask.shape
    if isinstance(pattern, NM):
        if cols % pattern.m:
            return False
        return bool((mask.reshape(-1, pattern.m).sum(1) <= pattern.n).all())
    if isinstance(pattern, FanIn):
        per_row = mask.sum(1)
        if pattern.k is not None:
            return bool((per_row <= pattern.k).all())
        return bool((per_row == per_row[0]).all()) if rows else True
    if isinstance(pattern, Block):
        if rows % pattern.h or cols % pattern.w:
            return False
        tiles = mask.reshape(rows // pattern.h, pattern.h, cols // pattern.w, pattern.w).sum(dim=(1, 3))
        return bool(((tiles == 0) | (tiles == pattern.h * pattern.w)).all())
    if isinstance(pattern, Channel):
        per_row = mask.sum(1)
        return bool(((per_row == 0) | (per_row == cols)).all())
    return True


# -- transposable N:M -------------------------------------------------------------------------------
_MAX_BLOCK_PATTERNS = 50_000
_BLOCK_PATTERNS: dict[tuple[int, int], torch.Tensor] = {}  # (n, m) -> (K, m*m) candidate masks, built once


def _block_patterns(n: int, m: int) -> torch.Tensor:
    """All m x m 0/1 matrices with exactly n ones in every row and every column, lexicographic, (K, m*m)."""
    if (n, m) not in _BLOCK_PATTERNS:
        rows = [r for r in itertools.product((1, 0), repeat=m) if sum(r) == n]  # kept-first order
        found: list[tuple[int, ...]] = []

        def extend(prefix: list[tuple[int, ...]], cols: list[int]) -> None:
            if len(found) > _MAX_BLOCK_PATTERNS:
                raise ConfigError(f"transposable {n}:{m} masks have too many {m}x{m} block patterns to search "
                                  f"exactly (> {_MAX_BLOCK_PATTERNS}); use M <= 4 (e.g. 2:4, 1:4) or M = 8 with N = 1")
            if len(prefix) == m:
                found.append(tuple(v for r in prefix for v in r))
                return
            left = m - len(prefix) - 1  # rows still to place after this one
            for r in rows:
                new = [c + v for c, v in zip(cols, r)]
                if all(n - left <= c <= n for c in new):  # every column can still reach exactly n
                    extend(prefix + [r], new)

        extend([], [0] * m)
        _BLOCK_PATTERNS[(n, m)] = torch.tensor(found, dtype=torch.float32)
    return _BLOCK_PATTERNS[(n, m)]


def transposable_mask(scores: torch.Tensor, pattern: "Pattern | str", *, chunk: int = 65536) -> torch.Tensor:
    """Keep-mask (out, in) that is N:M along the inputs *and* along the outputs (its transpose is N:M too).

    The weight is cut into M x M blocks; every block takes, among all M x M masks with exactly N
    kept per row and per column, the one with the largest sum of scores (an exact search, the same
    choice as the convolution-based selection of Hu et al. 2024, "Accelerating Transformer
    Pre-training with 2:4 Sparsity", which scores the 90 such 2:4 patterns of a 4x4 block). Ties go
    to the first pattern in lexicographic order with kept entries first. The mask keeps exactly N of
    every M along both dimensions (density N/M, as the trainers expect); a mask allowed to keep
    *at most* N (e.g. a greedy one) can leave a row short and keep more score with fewer weights.
    Both dimensions must be divisible by M; M x M blocks with too many patterns (e.g. 4:8) are refused.

    Example:
        >>> s = torch.tensor([[9., 8, 1, 0], [7, 6, 0, 1], [5, 4, 1, 0], [0, 1, 2, 3]])
        >>> mask_from_scores(s, "2:4").int().tolist()  # row-wise: columns 0 and 1 keep 3 of 4
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]
        >>> transposable_mask(s, "2:4").int().tolist()  # 2 per row and 2 per column
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    pattern = parse(pattern)
    if not isinstance(pattern, NM):
        raise ConfigError(f"transposable masks are N:M masks; pattern {pattern} is not N:M (use e.g. '2:4')")
    if scores.dim() != 2:
        raise ConfigError(f"scores must be 2-D (out_features, in_features), got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    m = pattern.m
    if rows % m or cols % m:
        raise ConfigError(f"a transposable {pattern} mask needs both dimensions divisible by M={m}, got shape "
                          f"{tuple(scores.shape)}; pad the layer or use a plain (row-wise) N:M mask")
    if not torch.isfinite(scores).all():
        raise NumericalError("pruning scores contain NaN or inf; check the weights and calibration activations")
    candidates = _block_patterns(pattern.n, m).to(scores.device)  # (K, m*m)
    blocks = scores.float().reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)  # (B, m*m)
    best = torch.cat([(part @ candidates.t()).argmax(1) for part in blocks.split(chunk)])  # (B,) first max
    chosen = candidates[best].bool().reshape(rows // m, cols // m, m, m)  # (R, C, m, m)
    return chosen.permute(0, 2, 1, 3).reshape(rows, cols)
