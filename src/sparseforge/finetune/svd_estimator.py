"""SparseLoRA's SVD sparsity estimator and the channel-skipping MLP forward, as pure tensor functions.

SparseLoRA (Khaki et al. 2025, "SparseLoRA: Accelerating LLM Fine-Tuning with Contextual Sparsity")
predicts, per input batch, which intermediate channels of a gated MLP
``down(act(gate(x)) * up(x))`` matter, from a rank-``r`` SVD of the **frozen** gate and up weights
(``W^T ~= A @ B``, ``A = U sqrt(S)``, ``B = sqrt(S) V^T``, computed once): the score of channel ``j``
is ``|| act(x A_g B_g)[:, j] * (x A_u B_u)[:, j] ||_2`` over the batch, and the base branch then
computes only the top ``(1 - sparsity)`` channels: the kept rows of gate and up, the kept columns of
down. The LoRA branches stay dense (the paper's default): a skipped channel still carries
``act(lora_gate(x)) * lora_up(x)`` into ``lora_down``.

* :func:`low_rank_factors` -- the rank-``r`` factors of one weight.
* :func:`ffn_channel_scores` -- the estimated contribution of each channel (sequence-averaged
  inputs by default, as the reference's ``mlp_seq_avg=True``).
* :func:`top_channels` -- the indices kept at a sparsity (sorted; at least one).
* :func:`skip_channel_mlp` -- the MLP forward whose base matmuls touch only the kept channels.

Example:
    >>> import torch
    >>> from torch.nn import functional as F
    >>> wg, wu = torch.randn(64, 16), torch.randn(64, 16)       # (intermediate, hidden)
    >>> fg, fu = low_rank_factors(wg, 8), low_rank_factors(wu, 8)
    >>> x = torch.randn(2, 10, 16)                               # (batch, tokens, hidden)
    >>> keep = top_channels(ffn_channel_scores(x, fg, fu, F.silu), sparsity=0.75)
    >>> keep.shape
    torch.Size([16])
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

__all__ = ["low_rank_factors", "ffn_channel_scores", "top_channels", "skip_channel_mlp", "kept_count"]

Delta = Callable[[torch.Tensor], torch.Tensor]


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(A, B)`` of ``weight^T``: ``x @ A @ B ~= x @ weight^T`` (float32).

    Args:
        weight: ``(out, in)``, as ``nn.Linear`` stores it.
        rank: kept singular values (clamped to ``min(out, in)``).

    Returns:
        ``A`` ``(in, r)`` = ``U[:, :r] sqrt(S_r)`` and ``B`` ``(r, out)`` = ``sqrt(S_r) V_r^T`` of the
        SVD ``weight^T = U S V^T``.
    """
    w_t = weight.detach().to(torch.float32).t()  # (in, out)
    u, s, vh = torch.linalg.svd(w_t, full_matrices=False)  # (in, k), (k,), (k, out)
    r = min(rank, s.numel())
    root = s[:r].sqrt()  # (r,)
    return (u[:, :r] * root).contiguous(), (root[:, None] * vh[:r]).contiguous()


def ffn_channel_scores(
    x: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor],
    up: tuple[torch.Tensor, torch.Tensor],
    act: Callable[[torch.Tensor], torch.Tensor],
    seq_avg: bool = True,
) -> torch.Tensor:
    """Estimated contribution of every intermediate channel of a gated MLP to this batch.

    Args:
        x: ``(batch, tokens, hidden)`` (or ``(tokens, hidden)``) inputs of the MLP.
        gate, up: the :func:`low_rank_factors` of the gate and up weights.
        act: the gate activation (``silu`` for Llama).
        seq_avg: average each sequence's tokens first (the reference's default for the MLP).

    Returns:
        ``(intermediate,)`` float32 scores ``|| act(x A_g B_g) * (x A_u B_u) ||_2`` over the rows.
    """
    with torch.no_grad():
        x = x.detach().to(torch.float32)
        if x.dim() == 2:
            x = x[None]  # (1, tokens, hidden)
        if seq_avg:
            x = x.mean(dim=1, keepdim=True)  # (batch, 1, hidden)
        rows = x.reshape(-1, x.shape[-1])  # (n, hidden)
        g = rows @ gate[0] @ gate[1]  # (n, intermediate)
        u = rows @ up[0] @ up[1]  # (n, intermediate)
        return (act(g) * u).norm(dim=0)  # (intermediate,)


def kept_count(channels: int, sparsity: float) -> int:
    """How many of ``channels`` a layer at ``sparsity`` keeps: ``int(channels * (1 - sparsity))``, at least 1."""
    return max(1, int(channels * (1.0 - sparsity)))


def top_channels(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Sorted indices ``(k,)`` of the ``k = kept_count(len(scores), sparsity)`` highest scores."""
    k = kept_count(scores.numel(), sparsity)
    return scores.topk(k).indices.sort().values


def _rows(weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor):
    return weight.index_select(0, keep), None if bias is None else bias.index_select(0, keep)


def skip_channel_mlp(
    x: torch.Tensor,
    keep: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor | None],
    up: tuple[torch.Tensor, torch.Tensor | None],
    down: tuple[torch.Tensor, torch.Tensor | None],
    act: Callable[[torch.Tensor], torch.Tensor],
    lora_gate: Delta | None = None,
    lora_up: Delta | None = None,
    lora_down: Delta | None = None,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` whose frozen base matmuls use only the channels ``keep``.

    Equals the dense MLP with the base gate/up rows and down columns outside ``keep`` set to zero
    (the LoRA deltas stay dense and see every channel).

    Args:
        x: ``(..., hidden)``.
        keep: ``(k,)`` int64 channel indices (:func:`top_channels`).
        gate, up: ``(weight (intermediate, hidden), bias (intermediate,) or None)`` of the base.
        down: ``(weight (hidden, intermediate), bias (hidden,) or None)`` of the base.
        act: the gate activation.
        lora_gate, lora_up, lora_down: the adapters' deltas as callables (``x -> (..., out)``), or None.

    Returns:
        ``(..., hidden)``.
    """
    wg, bg = _rows(*gate, keep)  # (k, hidden)
    wu, bu = _rows(*up, keep)  # (k, hidden)
    g = F.linear(x, wg, bg)  # (..., k)
    u = F.linear(x, wu, bu)  # (..., k)
    w_down, b_down = down
    if lora_gate is None and lora_up is None:
        h_kept = act(g) * u  # (..., k): a skipped channel is act(0) * 0 = 0 in the base and the adapters
        h_full = None
        if lora_down is not None:
            h_full = torch.zeros(*h_kept.shape[:-1], w_down.shape[1], dtype=h_kept.dtype, device=h_kept.device)
            h_full = h_full.index_copy(-1, keep, h_kept)  # (..., intermediate)
    else:
        g_full = lora_gate(x) if lora_gate is not None else x.new_zeros(*x.shape[:-1], gate[0].shape[0])
        u_full = lora_up(x) if lora_up is not None else x.new_zeros(*x.shape[:-1], up[0].shape[0])
        g_full = g_full.index_add(-1, keep, g)  # (..., intermediate): base on the kept channels + dense LoRA
        u_full = u_full.index_add(-1, keep, u)  # (..., intermediate)
        h_full = act(g_full) * u_full  # (..., intermediate)
        h_kept = h_full.index_select(-1, keep)  # (..., k)
    out = F.linear(h_kept, w_down.index_select(1, keep), b_down)  # (..., hidden)
    if lora_down is not None:
        out = out + lora_down(h_full)
    return out
