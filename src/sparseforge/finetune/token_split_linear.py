"""A frozen linear layer that runs sparse on the context tokens and dense on the output tokens, in one autograd node.

SparseLoRA (Khaki et al. 2025, "SparseLoRA: Accelerating LLM Fine-Tuning with Contextual
Sparsity"; reference code z-lab/sparselora ``spft/modules/{linear,mlp}.py``) computes the frozen
base of a gated MLP on the kept channels only for the context tokens, and densely for the output
tokens, while the LoRA branches stay dense on every token. The reference splits the tokens,
runs the whole MLP twice (each half with its own LoRA calls) and joins the halves. On CPU at
small widths those extra calls and copies cost about what the skipped channels save, so
:func:`token_split_linear` keeps one pass over every token: the caller computes the LoRA delta
on all tokens once, and this function adds the base product into it,

* ``mode="rows"`` (gate / up): ``out[:, :c, keep] += x[:, :c] @ W[keep]^T (+ b[keep])`` and
  ``out[:, c:] += x[:, c:] @ W^T (+ b)``: on the context tokens the skipped output channels get
  no base contribution (they are 0 in the base, as the reference's ``out_scatter``);
* ``mode="cols"`` (down): ``out[:, :c] += x[:, :c, keep] @ W[:, keep]^T`` and
  ``out[:, c:] += x[:, c:] @ W^T``, plus ``b`` on every token: on the context tokens the base
  reads only the kept input channels (the reference's ``in_gather``).

The base is frozen, so the backward computes only the gradient of ``x`` (through the same kept
rows / columns) and passes the output gradient through to the delta: no weight gradients, no
saved activations besides the gathered weight slice.

Example:
    >>> import torch
    >>> x = torch.randn(2, 8, 16, requires_grad=True)              # (batch, tokens, in)
    >>> w = torch.randn(32, 16)                                     # frozen (out, in)
    >>> keep = torch.tensor([0, 3, 5, 9])                           # kept output channels
    >>> out = token_split_linear(x, None, w, None, keep, context=6, mode="rows")
    >>> out.shape, bool((out[:, :6, 1] == 0).all())                 # channel 1 skipped on context tokens
    (torch.Size([2, 8, 32]), True)
"""

from __future__ import annotations

from typing import Any

import torch

from sparseforge.errors import ConfigError, ModelError

__all__ = ["token_split_linear", "TokenSplitLinear"]

MODES = ("rows", "cols")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens, f)`` (any strides) -> a contiguous ``(batch * tokens, f)``."""
    return t.reshape(-1, t.shape[-1])


class TokenSplitLinear(torch.autograd.Function):
    """``delta + base(x)`` with the base restricted to ``keep`` on the first ``context`` tokens (module doc)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                keep: torch.Tensor, context: int, mode: str) -> torch.Tensor:
        # x: (B, T, in); delta: (B, T, out) or None; weight: (out, in); keep: (k,)
        batch, tokens, _ = x.shape
        n_out = weight.shape[0]
        if delta is not None:
            ctx.mark_dirty(delta)  # the base is added into the delta in place: one (B, T, out) tensor, no copy
            out = delta
        else:
            out = x.new_zeros(batch, tokens, n_out)  # (B, T, out)
        dense = tokens - context
        if mode == "rows":
            w_kept = weight.index_select(0, keep)  # (k, in)
            if context:
                kept = _flat(x[:, :context]) @ w_kept.t()  # (B * c, k)
                if bias is not None:
                    kept += bias.index_select(0, keep)
                out[:, :context].index_add_(-1, keep, kept.view(batch, context, -1))
            if dense:
                out[:, context:] += (_flat(x[:, context:]) @ weight.t()).view(batch, dense, n_out)
                if bias is not None:
                    out[:, context:] += bias
        else:
            w_kept = weight.index_select(1, keep)  # (out, k)
            if context:
                x_kept = x[:, :context].index_select(-1, keep)  # (B, c, k)
                out[:, :context] += (_flat(x_kept) @ w_kept.t()).view(batch, context, n_out)
            if dense:
                out[:, context:] += (_flat(x[:, context:]) @ weight.t()).view(batch, dense, n_out)
            if bias is not None:
                out += bias
        ctx.save_for_backward(weight, w_kept, keep)
        ctx.context, ctx.mode, ctx.in_features = context, mode, x.shape[-1]
        ctx.has_delta = delta is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # grad_out: (B, T, out)
        weight, w_kept, keep = ctx.saved_tensors
        c = ctx.context
        batch, tokens, _ = grad_out.shape
        dense = tokens - c
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.new_empty(batch, tokens, ctx.in_features)  # (B, T, in), every row written below
            if ctx.mode == "rows":
                if c:
                    g_kept = _flat(grad_out[:, :c].index_select(-1, keep))  # (B * c, k)
                    grad_x[:, :c] = (g_kept @ w_kept).view(batch, c, -1)
            elif c:
                g_kept = _flat(grad_out[:, :c]) @ w_kept  # (B * c, k)
                grad_x[:, :c].zero_().index_copy_(-1, keep, g_kept.view(batch, c, -1))  # skipped inputs: 0
            if dense:
                grad_x[:, c:] = (_flat(grad_out[:, c:]) @ weight).view(batch, dense, -1)
        grad_delta = grad_out if ctx.has_delta and ctx.needs_input_grad[1] else None
        return grad_x, grad_delta, None, None, None, None, None


def token_split_linear(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                       keep: torch.Tensor, context: int, mode: str) -> torch.Tensor:
    """``delta + base(x)``: the frozen base on the kept channels for the first ``context`` tokens, dense after.

    Args:
        x: ``(batch, tokens, in)``.
        delta: ``(batch, tokens, out)`` the base is added to, in place (the LoRA branch, dense; a fresh
            non-leaf tensor), or None.
        weight: ``(out, in)`` frozen base weight; bias: ``(out,)`` or None (frozen).
        keep: ``(k,)`` int64 channel indices: output rows (``mode="rows"``) or input columns (``"cols"``).
        context: how many leading tokens of each window run sparse (0..tokens).
        mode: ``"rows"`` (gate / up projections) or ``"cols"`` (down projection).

    Returns:
        ``(batch, tokens, out)``.

    Raises:
        ConfigError: an unknown mode or a context outside ``[0, tokens]``.
        ModelError: a base weight or bias that requires a gradient (the base must be frozen).
    """
    if mode not in MODES:
        raise ConfigError(f"token_split_linear mode must be one of {MODES}, got {mode!r}")
    if x.dim() != 3 or not 0 <= context <= x.shape[1]:
        raise ConfigError(f"token_split_linear needs x (batch, tokens, in) and 0 <= context <= tokens; got x "
                          f"{tuple(x.shape)}, context {context}")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ModelError("token_split_linear computes no weight gradient: freeze the base layer (requires_grad_(False))")
    return TokenSplitLinear.apply(x, delta, weight, bias, keep, context, mode)
