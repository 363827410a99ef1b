"""S²FT: structured sparse fine-tuning, "select sparsely, compute densely" (Yang et al. 2024).

"S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity" (NeurIPS 2024)
trains a few attention heads and FFN channels per block and freezes everything else:

1. select units within a parameter budget (:mod:`sparseforge.finetune.s2ft_select`);
2. co-permute each block so the selected units come first, its function unchanged
   (:mod:`sparseforge.finetune.s2ft_permute`);
3. swap each trained projection for a :class:`SliceLinear`: the first rows (q, k, v, up, gate) or
   columns (o, down) are a dense trainable ``nn.Parameter``, the rest a frozen buffer; the optimizer
   only sees the slices, and backward computes weight gradients only for them;
4. after training, fuse: write the slices back into dense ``nn.Linear`` weights and undo the
   permutation, so the model has its original layout and only the selected rows/columns changed.

A pruned projection keeps its mask: the slice's gradient is masked (so AdamW's moments stay zero
there) and the slice is re-masked after every step; pruned weights stay exactly zero, N:M stays N:M.

:class:`S2FTRun` is what :func:`sparseforge.finetune.finetune_` uses with
``FinetuneConfig(adapter="s2ft")``; it also serves as the run's mask keeper (``step``, ``remove``,
``state_dict``).

Example:
    >>> from sparseforge.finetune import FinetuneConfig, S2FTConfig, finetune_
    >>> cfg = FinetuneConfig(loss="ce", adapter="s2ft", s2ft=S2FTConfig(budget=0.01), lr=1e-3)
    >>> finetune_("pruned/", cfg, out="tuned/")            # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import ConfigError
from sparseforge.finetune.s2ft_blocks import ROW_PARTS, Block, find_blocks, unit_width
from sparseforge.finetune.s2ft_options import HEAD_PARTS, S2FTConfig
from sparseforge.finetune.s2ft_permute import front_order, inverse, permute_block_
from sparseforge.finetune.s2ft_select import STRUCTURES, activation_scores, allocate, select_units
from sparseforge.layers import set_module

__all__ = ["SliceLinear", "S2FTRun", "budget_parameters", "check_model", "peek_batches"]


class SliceLinear(nn.Module):
    """A linear layer whose first ``size`` rows (``axis=0``) or columns (``axis=1``) train; the rest is frozen.

    ``axis=0``: ``y = cat(x @ trainableᵀ, x @ frozenᵀ) + b``; ``axis=1``:
    ``y = x[..., :size] @ trainableᵀ + x[..., size:] @ frozenᵀ + b``. ``mask`` (same shape as the
    slice): pruned positions whose gradient and value stay zero.
    """

    def __init__(self, linear: nn.Linear, axis: int, size: int, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        w = linear.weight.detach()  # (out, in)
        self.axis, self.size = axis, size
        self.in_features, self.out_features = linear.in_features, linear.out_features
        head, tail = (w[:size], w[size:]) if axis == 0 else (w[:, :size], w[:, size:])
        self.trainable = nn.Parameter(head.clone())  # (size, in) or (out, size)
        self.register_buffer("frozen", tail.clone())  # (out - size, in) or (out, in - size)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())  # (out,)
        self.register_buffer("mask", mask)
        if mask is not None:
            self.trainable.register_hook(lambda grad: grad * self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.axis == 0:
            y = torch.cat([F.linear(x, self.trainable), F.linear(x, self.frozen)], dim=-1)
            return y if self.bias is None else y + self.bias
        return F.linear(x[..., :self.size], self.trainable) + F.linear(x[..., self.size:], self.frozen, self.bias)

    @torch.no_grad()
    def apply_mask_(self) -> None:
        if self.mask is not None:
            self.trainable.mul_(self.mask)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The fused dense ``nn.Linear`` (slice written back into its place)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.frozen.device, dtype=self.frozen.dtype)
        out.weight.copy_(torch.cat([self.trainable, self.frozen], dim=self.axis))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        what = "rows" if self.axis == 0 else "columns"
        return f"in_features={self.in_features}, out_features={self.out_features}, trainable {what}={self.size}"


def budget_parameters(model: nn.Module, budget: float | int) -> int:
    """The budget as a parameter count: a fraction of ``model``'s parameters, or the count itself."""
    if isinstance(budget, float):
        return int(budget * sum(p.numel() for p in model.parameters()))
    return int(budget)


def check_model(model: nn.Module, config: S2FTConfig) -> None:
    """Raise ModelError / ConfigError if S²FT with ``config`` cannot run on ``model`` (its blocks, the budget)."""
    allocate(find_blocks(model, config.parts), config.parts, budget_parameters(model, config.budget))


class S2FTRun:
    """S²FT on ``model`` for one fine-tuning run: select, co-permute, slice; :meth:`remove` fuses back.

    Args:
        model: a Llama-style model (:func:`~sparseforge.finetune.s2ft_blocks.find_blocks`).
        config: the :class:`S2FTConfig`. pruned: names of pruned linear layers whose zeros are kept.
        seed: of the random selection. calibration: a callable returning the batches that score
            ``select="activation"``.
    """

    def __init__(self, model: nn.Module, config: S2FTConfig, pruned: list[str] = (), seed: int = 0,
                 calibration: Callable[[], list[dict[str, torch.Tensor]]] | None = None) -> None:
        self.model, self.config = model, config
        self.blocks: list[Block] = find_blocks(model, config.parts)
        self.budget = budget_parameters(model, config.budget)
        activations = None
        if config.select == "activation":
            if calibration is None:
                raise ConfigError("S²FT select='activation' needs calibration batches (finetune_ draws them from the data)")
            batches = calibration()
            activations = {s: activation_scores(model, self.blocks, s, batches)
                           for s, parts in STRUCTURES.items() if set(parts) & set(config.parts)}
        self.picks = select_units(self.blocks, config.parts, self.budget, config.select,
                                  torch.Generator().manual_seed(seed), activations)
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.orders: list[tuple[list[int] | None, list[int] | None]] = []
        self.slices: dict[str, SliceLinear] = {}
        self.step_count = 0
        pruned = set(pruned)
        model.requires_grad_(False)
        for block, pick in zip(self.blocks, self.picks):
            kv_order = front_order(pick["heads"], block.kv_heads) if block.kv_heads else None
            channel_order = front_order(pick["channels"], block.channels) if block.channels else None
            permute_block_(block, kv_order, channel_order)
            self.orders.append((kv_order, channel_order))
            for part in config.parts:
                units = len(pick["heads"] if part in HEAD_PARTS else pick["channels"])
                if units == 0:
                    continue
                name, linear = block.linear_name(part), block.linear(part)
                axis, size = (0 if part in ROW_PARTS else 1), units * unit_width(block, part)
                mask = None
                if name in pruned:
                    w = linear.weight.detach()
                    mask = (w[:size] if axis == 0 else w[:, :size]) != 0  # (size, in) or (out, size)
                layer = SliceLinear(linear, axis, size, mask)
                set_module(model, name, layer)
                self.slices[name] = layer

    def parameters(self) -> list[nn.Parameter]:
        """The trainable slices, in model order: all that the optimizer sees."""
        return [layer.trainable for layer in self.slices.values()]

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def selection(self) -> list[dict[str, Any]]:
        """Per block: its name and the selected key/value heads and channels (original indices)."""
        return [{"block": b.name, **p} for b, p in zip(self.blocks, self.picks)]

    # -- the mask keeper interface of finetune_ ------------------------------------------------------
    def step(self) -> None:
        """After an optimizer step: pruned positions of the slices back to exactly zero."""
        for layer in self.slices.values():
            layer.apply_mask_()
        self.step_count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "selection": self.selection()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("selection") != self.selection():
            self.remove()  # the model back as it came: fused, unpermuted
            raise ConfigError("the resumable state was made with another S²FT selection of heads and channels; "
                              "use another resume directory")
        self.step_count = int(state["step"])

    def remove(self) -> None:
        """Fuse: slices back into dense ``nn.Linear`` layers, the permutation undone, requires_grad restored."""
        for name, layer in self.slices.items():
            layer.apply_mask_()
            set_module(self.model, name, layer.to_linear())
        self.slices = {}
        for block, (kv_order, channel_order) in zip(self.blocks, self.orders):
            permute_block_(block, inverse(kv_order) if kv_order else None,
                           inverse(channel_order) if channel_order else None)
        self.orders = []
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad.get(name, True))


def peek_batches(batches: Any, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of a finetune batch stream, leaving its generator where it was (the run sees the same data)."""
    state = batches.generator.get_state()
    try:
        return [batches.next() for _ in range(n)]
    finally:
        batches.generator.set_state(state)
