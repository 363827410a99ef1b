"""SparseLoRA's attention part: the frozen q/k/v/o projections skip the channels an SVD estimator deems idle.

Khaki et al. 2025, "SparseLoRA: Accelerating LLM Fine-Tuning with Contextual Sparsity" (reference
code z-lab/sparselora, ``spft/modules/{attn,pred,svd,linear}.py``). For every chosen attention block
(children ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), while training and past the dense start:

* a forward pre-hook on the attention module scores the channels of the block's input batch
  (:func:`~sparseforge.finetune.svd_estimator.attention_channel_scores`: rank-8 SVD factors of the
  frozen q/k/v weights, all tokens, QK product norm with the query norms averaged over each GQA
  group, V norm) and keeps the top ``1 - sparsity`` key and value channels
  (:func:`~sparseforge.finetune.svd_estimator.attention_channels`);
* the frozen base layers of the four projections are swapped for :class:`ChannelSkipLinear`
  (an ``nn.Linear`` sharing the same weight and bias, so state-dict names and merges are
  unchanged): on the **context tokens** q/k/v compute only the kept output rows (the others are
  zero, as the reference's ``out_scatter``) and ``o_proj`` reads only the kept input columns (the
  attention-output channels of the kept value channels, ``in_gather``); the **output tokens** and
  the LoRA branches stay dense; the rotary embedding and the attention kernel are the model's own.

The schedule (dense start, eval mode, output tokens, first and last blocks) is the one of the MLP
part, driven by :class:`~sparseforge.finetune.sparselora.SparseLoRA`. Where the reference maps a
kept key channel ``c`` to the query channels ``c * groups + g`` (a layout where query groups are
interleaved per channel), this module uses the layout of the HF attention it wraps (query head
``h`` reads key head ``h // groups``), and ``o_proj`` columns are mapped to query-head space the
same way, so GQA models keep exactly the channels that pair in the dot products. Gradients flow
through the sparse base to the block input (the reference gathers ``o_proj``'s input under
``no_grad``).

Example:
    >>> from sparseforge.finetune.lora import attach_lora                          # doctest: +SKIP
    >>> attach_lora(model, rank=8)                                                # doctest: +SKIP
    >>> sparse = SparseLoRA.attach(model, sparsity=0.9, attn_sparsity=0.6)        # doctest: +SKIP
    >>> sparse.attention["model.layers.3.self_attn"].last_kept.k                  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sparseforge.errors import ModelError
from sparseforge.finetune.svd_estimator import (
    AttentionChannels,
    attention_channel_scores,
    attention_channels,
    kept_columns_linear,
    kept_rows_linear,
    low_rank_factors,
)

__all__ = ["ChannelSkipLinear", "SparseLoRAAttention", "attention_blocks"]

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def _base(proj: nn.Module) -> nn.Module:
    return proj.get_base_layer() if hasattr(proj, "get_base_layer") else proj


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the attention modules with separate linear ``q_proj``/``k_proj``/``v_proj``/``o_proj``."""
    return {name: module for name, module in model.named_modules()
            if all(hasattr(module, p) for p in ATTN_PROJ)
            and all(isinstance(_base(getattr(module, p)), nn.Linear) for p in ATTN_PROJ)}


class ChannelSkipLinear(nn.Linear):
    """The frozen base of one attention projection: dense, or restricted to the block's kept channels.

    Shares ``weight`` and ``bias`` with the ``nn.Linear`` it stands in for. ``role`` is ``"q"``,
    ``"k"`` or ``"v"`` (kept output rows, the others zero) or ``"o"`` (kept input columns).
    """

    def __init__(self, linear: nn.Linear, block: "SparseLoRAAttention", role: str) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.role = role
        self._block = (block,)  # a tuple: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, in)
        block = self._block[0]
        channels = block.current
        if channels is None:
            return F.linear(x, self.weight, self.bias)
        keep = getattr(channels, self.role)
        sparse = kept_columns_linear if self.role == "o" else kept_rows_linear
        n_ctx = block.n_ctx
        if n_ctx == x.shape[-2]:
            return sparse(x, self.weight, self.bias, keep)
        # one split (its backward is one concatenation) into contiguous parts: 2-D matmuls, not the batched path
        x_ctx, x_out = (part.contiguous() for part in x.split([n_ctx, x.shape[-2] - n_ctx], dim=-2))
        ctx = sparse(x_ctx, self.weight, self.bias, keep)  # (batch, n_ctx, out)
        return torch.cat([ctx, F.linear(x_out, self.weight, self.bias)], dim=-2)  # sparse | dense


class SparseLoRAAttention:
    """One attention block under SparseLoRA: the estimator, the hooks and the swapped base layers (module doc)."""

    def __init__(self, attention: nn.Module, controller: Any, sparsity: float, rank: int) -> None:
        """``controller``: the :class:`~sparseforge.finetune.sparselora.SparseLoRA` schedule (``active``, ``context_tokens``)."""
        self.attention, self.sparsity = attention, sparsity
        self._controller = controller
        q, k, v, o = (_base(getattr(attention, p)) for p in ATTN_PROJ)
        head_dim = getattr(attention, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim <= 0 or k.out_features % head_dim or q.out_features % head_dim:
            raise ModelError(f"SparseLoRA attention needs the block's head_dim (got {head_dim!r} for q {q.out_features} "
                             f"/ k {k.out_features} channels); pass sparselora attention sparsity 0")
        q_heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
        if q_heads % kv_heads or v.out_features != k.out_features or o.in_features != q.out_features:
            raise ModelError(f"SparseLoRA attention expects GQA projections (q {q.out_features}, k {k.out_features}, "
                             f"v {v.out_features}, o input {o.in_features}); pass sparselora attention sparsity 0")
        self.head_dim, self.groups = head_dim, q_heads // kv_heads
        self.factors = {p: low_rank_factors(w.weight, rank) for p, w in (("q", q), ("k", k), ("v", v))}
        self.current: AttentionChannels | None = None  # set between the hooks of a sparse forward
        self.last_kept: AttentionChannels | None = None
        self.n_ctx = 0
        self.originals: dict[str, nn.Linear] = {}
        for proj, role in zip(ATTN_PROJ, "qkvo"):
            self._swap(proj, ChannelSkipLinear(_base(getattr(attention, proj)), self, role))
        self.handles = [attention.register_forward_pre_hook(self._select, with_kwargs=True),
                        attention.register_forward_hook(self._clear, always_call=True)]

    def _swap(self, proj: str, new: nn.Linear) -> None:
        holder = getattr(self.attention, proj)
        if hasattr(holder, "base_layer"):  # a peft LoRA layer: replace its frozen base only
            self.originals.setdefault(proj, holder.base_layer)
            holder.base_layer = new
        else:
            self.originals.setdefault(proj, holder)
            setattr(self.attention, proj, new)

    def keep(self, x: torch.Tensor) -> AttentionChannels:
        """The channels the estimator keeps for the batch ``x`` ``(batch, tokens, hidden)``."""
        qk, v = attention_channel_scores(x, self.factors["q"], self.factors["k"], self.factors["v"], self.head_dim)
        return attention_channels(qk, v, self.sparsity, self.groups, self.head_dim)

    def _select(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.current = None
        controller = self._controller
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (batch, tokens, hidden)
        if not (module.training and controller.active) or x.dim() < 2:
            return
        n_ctx = controller.context_tokens(x.shape[-2])
        if n_ctx == 0:
            return
        self.n_ctx = n_ctx
        self.current = self.last_kept = self.keep(x)

    def _clear(self, *_: Any) -> None:
        self.current = None

    def remove(self) -> None:
        """Put the original base layers back (with their current, possibly LoRA-wrapped, holders)."""
        for handle in self.handles:
            handle.remove()
        for proj, original in self.originals.items():
            holder = getattr(self.attention, proj)
            if isinstance(holder, ChannelSkipLinear):
                setattr(self.attention, proj, original)
            else:
                holder.base_layer = original
        self.originals, self.handles = {}, []
