"""R-Sparse: rank-aware activation sparsity ("R-Sparse: Rank-Aware Activation Sparsity for Efficient
LLM Inference"; reference code VITA-Group/R-Sparse, read in its copy Calamansi39/R-Sparse).

A projection ``y = W x + b`` (``W`` ``(out, in)``) keeps the input channels whose *scaled* magnitude
``|x_i| * ||W[:, i]||`` is above a threshold ``t`` and sends the rest through a rank-``r`` SVD of
``W`` instead of dropping them::

    m = |x * scale| > t                      (scale_i = ||W[:, i]||_2, the column norm)
    y = W (x * m) + b + ((x * (1 - m)) V_r S_r) U_r^T          (W = U S V^T)

The mask ``|x_i| scale_i > t`` is the per-channel threshold ``|x_i| > t / scale_i``, so the sparse part
is a :class:`~sparseforge.activation.SparseInputLinear` with per-channel thresholds (the native kernel
skips the masked channels' weights); the low-rank term reads ``r (in + out)`` more values.

Budget (the reference's ``set_threshold_r_sparse``): a layer at sparsity ``s`` may read
``(1 - s) in out`` weights. A share ``rho`` of that goes to channels (``kept = in (1 - s) rho``, i.e.
channel sparsity ``1 - (1 - s) rho``) and the rest to the rank: ``r = floor(((1 - s) in out - kept
out) / (in + out))``. ``rho = 1`` is scale-aware TEAL (no low-rank term), ``rho = 0.95`` the paper's
uniform baseline. ``t`` is the channel-sparsity quantile of ``|x * scale|`` over the calibration
activations of the dense model (the reference takes a top-k quantile of one 512-token sequence;
here TEAL's 10,000-bin histogram over all calibration tokens).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparseforge.activation.rsparse import RSparseLinear
    >>> dense = nn.Linear(16, 8)
    >>> layer = RSparseLinear.from_linear(dense, threshold=0.5, rank=8)   # full rank: exact at any threshold
    >>> x = torch.randn(3, 16)
    >>> torch.allclose(layer(x), dense(x), atol=1e-5)
    True
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from sparseforge.activation.calibrate import Histogram
from sparseforge.activation.linear import SparseInputLinear
from sparseforge.errors import ConfigError

__all__ = ["RSparseLinear", "rsparse_budget", "column_norms", "per_channel_threshold", "calibrate_rsparse"]


def rsparse_budget(in_features: int, out_features: int, sparsity: float, rho: float) -> tuple[float, int]:
    """``(channel sparsity, rank)`` of a layer at bytes-sparsity ``sparsity`` with ``rho`` of its
    budget on channels (the reference's split; see the module doc)."""
    if not 0.0 <= rho <= 1.0:
        raise ConfigError(f"rsparse_ratio must be in [0, 1], got {rho!r}")
    kept = in_features * (1.0 - sparsity) * rho
    rank = int((in_features * out_features * (1.0 - sparsity) - int(kept) * out_features) / (in_features + out_features))
    return 1.0 - (1.0 - sparsity) * rho, max(0, min(rank, in_features, out_features))


def column_norms(weight: Tensor) -> Tensor:
    """``||W[:, i]||_2`` for an ``(out, in)`` weight: R-Sparse's per-input-channel ``scale``."""
    return torch.linalg.vector_norm(weight.detach().double(), dim=0).float()  # (in,)


def per_channel_threshold(t: float, scale: Tensor) -> Tensor:
    """``t / scale`` (``|x_i| scale_i <= t`` as a threshold on ``|x_i|``); +inf where ``scale`` is 0."""
    out = torch.full_like(scale, math.inf)
    nonzero = scale > 0
    out[nonzero] = t / scale[nonzero]
    return out


class RSparseLinear(SparseInputLinear):
    """A :class:`SparseInputLinear` plus the low-rank path for the skipped channels (module doc).

    Buffers: ``lowrank_in`` ``(in, r)`` = ``V_r S_r`` and ``lowrank_out`` ``(r, out)`` = ``U_r^T``
    (float32), from the SVD of the stored weight; ``threshold`` per input channel.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, threshold: "float | Tensor" = 0.0,
                 rank: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, threshold=threshold, dtype=dtype)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(in_features, out_features):
            raise ConfigError(f"R-Sparse rank must be an integer in [0, {min(in_features, out_features)}], got {rank!r}")
        self.rank = rank
        self.register_buffer("lowrank_in", torch.zeros(in_features, rank))
        self.register_buffer("lowrank_out", torch.zeros(rank, out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: "float | Tensor" = 0.0, dtype: Optional[torch.dtype] = None,
                    rank: int = 0) -> "RSparseLinear":
        """The layer of ``linear`` with the rank-``rank`` SVD of its weight (float64 SVD, stored float32)."""
        base = SparseInputLinear.from_linear(linear, threshold=threshold, dtype=dtype)
        layer = cls(base.in_features, base.out_features, base.bias is not None, threshold=base.threshold, rank=rank,
                    dtype=base.weight_t.dtype)
        layer.weight_t, layer.bias = base.weight_t, base.bias
        layer.set_lowrank()
        return layer

    def set_lowrank(self) -> None:
        """Recompute ``lowrank_in`` / ``lowrank_out`` from the stored weight at ``self.rank``."""
        w = self.weight_t.detach().t().double()  # (out, in)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # u (out, k), s (k,), vh (k, in)
        r = self.rank
        self.lowrank_in = (vh[:r].t() * s[:r]).float().contiguous()  # (in, r)
        self.lowrank_out = u[:, :r].t().float().contiguous()  # (r, out)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)  # W (x * m) + b, with the token_fraction convention
        if self.rank == 0:
            return y
        x32 = x.float()
        skipped = torch.where(x32.abs() <= self.threshold, x32, torch.zeros((), dtype=x32.dtype))  # (..., in)
        if self.token_fraction < 1.0 and x.dim() >= 2 and x.shape[-2] > 1:
            dense_tokens = x.shape[-2] - int(x.shape[-2] * self.token_fraction)
            skipped[..., :dense_tokens, :] = 0  # the dense prefix skipped nothing
        low = (skipped @ self.lowrank_in) @ self.lowrank_out  # (..., out)
        return y + low.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


def calibrate_rsparse(weight: Tensor, inputs: list[Tensor], sparsity: float,
                      rho: "float | Sequence[float]") -> tuple[float, Tensor, int, float, float]:
    """R-Sparse's calibration of one projection from its ``(out, in)`` weight and its dense inputs
    ``[(..., in)]``: ``(t, per-channel thresholds, rank, skipped fraction of the calibration inputs,
    rho)``. Several ``rho`` candidates: the one whose layer output error
    ``||(W - W_r)(x * (1 - m))||`` on (at most 4096 of) the calibration tokens is lowest."""
    out_features, in_features = weight.shape
    scale = column_norms(weight)  # (in,)
    rows = torch.cat([x.detach().reshape(-1, in_features).float() for x in inputs])  # (tokens, in)
    hist = Histogram.of((rows.abs() * scale).reshape(-1))
    candidates = [float(rho)] if isinstance(rho, (int, float)) else [float(r) for r in rho]
    if sparsity <= 0:
        return 0.0, torch.zeros(in_features), 0, float((rows == 0).float().mean()), candidates[0]
    sample = rows[torch.linspace(0, len(rows) - 1, min(len(rows), 4096)).long()]  # (n, in)
    w = weight.detach().double()
    u, sv, vh = torch.linalg.svd(w, full_matrices=False) if len(candidates) > 1 else (None, None, None)
    best = None
    for r in candidates:
        channel_sparsity, rank = rsparse_budget(in_features, out_features, sparsity, r)
        t = hist.threshold(channel_sparsity, signed=False)
        thresholds = per_channel_threshold(t, scale)
        error = 0.0
        if len(candidates) > 1:
            skipped = torch.where(sample.abs() <= thresholds, sample, torch.zeros(())).double()  # (n, in)
            residual = w - (u[:, :rank] * sv[:rank]) @ vh[:rank]  # (out, in): W - W_r
            error = float(torch.linalg.vector_norm(skipped @ residual.t()))
        if best is None or error < best[0]:
            best = (error, t, thresholds, rank, r)
    _, t, thresholds, rank, r = best
    skipped_fraction = float((rows.abs() <= thresholds).float().mean())
    return t, thresholds, rank, skipped_fraction, r
