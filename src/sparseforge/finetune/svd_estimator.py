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
* :func:`attention_channel_scores` / :func:`attention_channels` -- the attention part: a QK
  product-norm score per key channel (GQA: the query norms averaged over the query heads that read
  each key head) and a V-norm score per value channel, over all tokens (the reference's
  ``qkvo_seq_avg=False``); the kept key channels select the query channels that meet them in the
  dot product, the kept value channels select the input columns of ``o_proj``.

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

from typing import Callable, NamedTuple

import torch
from torch.nn import functional as F

__all__ = ["low_rank_factors", "ffn_channel_scores", "top_channels", "skip_channel_mlp", "kept_count",
           "attention_channel_scores", "attention_channels", "query_channels", "AttentionChannels",
           "kept_rows_linear", "kept_columns_linear"]

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


def _scoring_rows(x: torch.Tensor, seq_avg: bool) -> torch.Tensor:
    """``(batch, tokens, hidden)`` or ``(tokens, hidden)`` -> float32 ``(n, hidden)`` rows to score (sequence means if ``seq_avg``)."""
    x = x.detach().to(torch.float32)
    if x.dim() == 2:
        x = x[None]  # (1, tokens, hidden)
    if seq_avg:
        x = x.mean(dim=1, keepdim=True)  # (batch, 1, hidden)
    return x.reshape(-1, x.shape[-1])  # (n, hidden)


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
        rows = _scoring_rows(x, seq_avg)  # (n, hidden)
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


class AttentionChannels(NamedTuple):
    """The channels the frozen base computes in one attention block (sorted int64 indices).

    ``q``: output rows of ``q_proj``; ``k``: of ``k_proj``; ``v``: of ``v_proj``; ``o``: input
    columns of ``o_proj`` (the attention-output channels fed by the kept value channels).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor


def _estimated_norms(rows: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``||rows @ A @ B||_2`` per output column without the ``(n, out)`` product: ``sqrt(diag(Bᵀ G B))``, ``G = (xA)ᵀ xA``."""
    xa = rows @ factors[0]  # (n, r)
    gram = xa.t() @ xa  # (r, r)
    return ((gram @ factors[1]) * factors[1]).sum(dim=0).clamp_min(0).sqrt()  # (out,)


def attention_channel_scores(
    x: torch.Tensor,
    q: tuple[torch.Tensor, torch.Tensor],
    k: tuple[torch.Tensor, torch.Tensor],
    v: tuple[torch.Tensor, torch.Tensor],
    head_dim: int,
    seq_avg: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated importance of every key/value channel of one attention block for this batch.

    The query norm of a channel is averaged over the ``groups = q_heads / kv_heads`` query heads
    that read its key head (HF layout: query head ``h`` reads key head ``h // groups``), then
    multiplied by the key norm: channel ``c`` of a key head contributes ``q_c k_c`` to every score
    of those query heads.

    Args:
        x: ``(batch, tokens, hidden)`` (or ``(tokens, hidden)``) inputs of the attention block.
        q, k, v: the :func:`low_rank_factors` of the q / k / v weights.
        head_dim: channels per head.
        seq_avg: average each sequence's tokens first (the reference's attention default: off).

    Returns:
        ``(qk, v)``: two ``(kv_heads * head_dim,)`` float32 score vectors.
    """
    with torch.no_grad():
        rows = _scoring_rows(x, seq_avg)  # (n, hidden)
        q_norm = _estimated_norms(rows, q)  # (q_heads * head_dim,)
        k_norm = _estimated_norms(rows, k)  # (kv_heads * head_dim,)
        v_norm = _estimated_norms(rows, v)  # (kv_heads * head_dim,)
        kv_heads = k_norm.numel() // head_dim
        q_mean = q_norm.view(kv_heads, -1, head_dim).mean(dim=1).reshape(-1)  # (kv_heads * head_dim,)
        return q_mean * k_norm, v_norm


def query_channels(kv_channels: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Sorted query (or attention-output) channels that meet the key (or value) channels ``kv_channels``.

    Channel ``d`` of key head ``j`` pairs with channel ``d`` of the query heads ``j * groups + g``,
    ``g < groups``.
    """
    head, dim = kv_channels // head_dim, kv_channels % head_dim  # (k,), (k,)
    g = torch.arange(groups, device=kv_channels.device)  # (groups,)
    channels = ((head[:, None] * groups + g[None, :]) * head_dim + dim[:, None]).reshape(-1)  # (k * groups,)
    return channels.sort().values


def attention_channels(qk: torch.Tensor, v: torch.Tensor, sparsity: float, groups: int, head_dim: int) -> AttentionChannels:
    """The channels an attention block keeps at ``sparsity`` from :func:`attention_channel_scores`.

    The top ``kept_count`` key channels by ``qk`` and the query channels that meet them; the top
    value channels by ``v`` and the attention-output channels (``o_proj`` inputs) they feed.
    """
    k_keep = top_channels(qk, sparsity)  # (k,)
    v_keep = top_channels(v, sparsity)  # (k,)
    return AttentionChannels(query_channels(k_keep, groups, head_dim), k_keep, v_keep,
                             query_channels(v_keep, groups, head_dim))


def kept_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computing only the output channels ``keep``; the others are 0.

    Args: x ``(..., in)``; weight ``(out, in)``; bias ``(out,)`` or None; keep ``(k,)``. Returns ``(..., out)``.
    """
    kept = F.linear(x, *_rows(weight, bias, keep))  # (..., k)
    full = kept.new_zeros(*kept.shape[:-1], weight.shape[0])  # (..., out)
    return full.index_copy(-1, keep, kept)


def kept_columns_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` reading only the input channels ``keep`` (the others count as 0).

    Args: x ``(..., in)``; weight ``(out, in)``; bias ``(out,)`` or None; keep ``(k,)``. Returns ``(..., out)``.
    """
    return F.linear(x.index_select(-1, keep), weight.index_select(1, keep), bias)  # (..., k) @ (k, out)
