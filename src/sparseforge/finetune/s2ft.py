"""S²FT: structured sparse fine-tuning, "select sparsely, compute densely" (Yang et al. 2024).

"S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity" (NeurIPS 2024)
trains a few attention heads and FFN channels per block and freezes everything else:

1. select units within a parameter budget (:mod:`sparseforge.finetune.s2ft_select`);
2. co-permute each block so the selected units come first, its function unchanged
   (:mod:`sparseforge.finetune.s2ft_permute`);
3. swap each trained projection for a :class:`SliceLinear`: the first rows (q, k, v, up, gate) or
   columns (o, down) are a dense trainable ``nn.Parameter``, the rest a frozen buffer (GPT-2's fused
   ``c_attn``: the first rows of each of its q / k / v ranges); the optimizer only sees the
   slices, and backward computes weight gradients only for them;
4. after training, fuse: write the slices back into the original ``nn.Linear`` / ``Conv1D`` modules
   and undo the permutation, so the model has its original layout and only the selected
   rows/columns changed.

Llama / Mistral / Qwen, GPT-2 and BERT / MiniLM blocks are supported
(:mod:`sparseforge.finetune.s2ft_blocks`).

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
from sparseforge.finetune.s2ft_options import S2FTConfig
from sparseforge.finetune.s2ft_permute import front_order, inverse, permute_block_
from sparseforge.finetune.s2ft_select import STRUCTURES, activation_scores, allocate, select_units
from sparseforge.layers import set_module, weight_2d

__all__ = ["SliceLinear", "S2FTRun", "budget_parameters", "check_model", "peek_batches", "unit_layout"]


class SliceLinear(nn.Module):
    """A linear-like layer whose row (``axis=0``) or column (``axis=1``) ranges ``ranges`` train; the rest is frozen.

    Stands in for an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2) ``module``, seen as an
    ``(out, in)`` weight: the weight is cut along ``axis`` into segments, each trainable range
    ``(start, size)`` an ``nn.Parameter`` (in ``trainable``, in range order) and every gap a frozen
    buffer. ``axis=0``: ``y = cat_s(x @ W_sᵀ) + b``; ``axis=1``: ``y = sum_s(x[..., cols_s] @ W_sᵀ) + b``.
    ``masks`` (one per range, or None): pruned positions whose gradient and value stay zero. The
    original module is kept (its weight storage released) and gets the fused weight back in
    :meth:`fuse`, so its class, layout and state-dict names are unchanged.
    """

    def __init__(self, module: nn.Module, axis: int, ranges: int | list[tuple[int, int]],
                 masks: list[torch.Tensor | None] | None = None) -> None:
        super().__init__()
        w = weight_2d(module).detach()  # (out, in)
        self.axis = axis
        self.out_features, self.in_features = w.shape
        ranges = [(0, ranges)] if isinstance(ranges, int) else sorted(ranges)
        masks = masks if masks is not None else [None] * len(ranges)
        self.trainable = nn.ParameterList()
        self._segments: list[tuple[bool, int, int, int]] = []  # (trainable, index, first, size) along axis
        pos, frozen = 0, 0
        for (first, size), mask in zip(ranges, masks):
            if first < pos or size <= 0 or first + size > w.shape[axis]:
                raise ValueError(f"S²FT slice ranges {ranges} overlap or leave the {w.shape[axis]} units of axis {axis}")
            if first > pos:
                self.register_buffer(f"frozen_{frozen}", w.narrow(axis, pos, first - pos).clone())
                self._segments.append((False, frozen, pos, first - pos))
                frozen += 1
            index = len(self.trainable)
            self.trainable.append(nn.Parameter(w.narrow(axis, first, size).clone()))  # (size, in) or (out, size)
            self.register_buffer(f"mask_{index}", mask)
            if mask is not None:
                self.trainable[index].register_hook(lambda grad, i=index: grad * getattr(self, f"mask_{i}"))
            self._segments.append((True, index, first, size))
            pos = first + size
        if pos < w.shape[axis]:
            self.register_buffer(f"frozen_{frozen}", w.narrow(axis, pos, w.shape[axis] - pos).clone())
            self._segments.append((False, frozen, pos, w.shape[axis] - pos))
        bias = getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())  # (out,)
        self._original = (module,)  # a tuple: not registered as a submodule
        module.weight.data = module.weight.data.new_empty(0)  # the segments hold the weight until fuse()

    def _segment(self, trainable: bool, index: int) -> torch.Tensor:
        return self.trainable[index] if trainable else getattr(self, f"frozen_{index}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.axis == 0:
            y = torch.cat([F.linear(x, self._segment(t, i)) for t, i, _, _ in self._segments], dim=-1)
            return y if self.bias is None else y + self.bias
        y = None
        for t, i, first, size in self._segments:
            part = F.linear(x[..., first:first + size], self._segment(t, i))
            y = part if y is None else y + part
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def apply_mask_(self) -> None:
        for index, param in enumerate(self.trainable):
            mask = getattr(self, f"mask_{index}")
            if mask is not None:
                param.mul_(mask)

    @torch.no_grad()
    def weight_2d(self) -> torch.Tensor:
        """The current ``(out, in)`` weight, segments put back together."""
        return torch.cat([self._segment(t, i) for t, i, _, _ in self._segments], dim=self.axis)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The original module, holding the current weight (its layout: Conv1D stores ``(in, out)``)."""
        module = self._original[0]
        w = self.weight_2d()  # (out, in)
        module.weight.data = w if isinstance(module, nn.Linear) else w.t().contiguous()
        return module

    def extra_repr(self) -> str:
        what = "rows" if self.axis == 0 else "columns"
        ranges = [(first, first + size) for t, _, first, size in self._segments if t]
        return f"in_features={self.in_features}, out_features={self.out_features}, trainable {what}={ranges}"


def budget_parameters(model: nn.Module, budget: float | int) -> int:
    """The budget as a parameter count: a fraction of ``model``'s parameters, or the count itself."""
    if isinstance(budget, float):
        return int(budget * sum(p.numel() for p in model.parameters()))
    return int(budget)


def check_model(model: nn.Module, config: S2FTConfig) -> None:
    """Raise ModelError / ConfigError if S²FT with ``config`` cannot run on ``model`` (its blocks, the budget)."""
    allocate(find_blocks(model, config.parts), config.parts, budget_parameters(model, config.budget), config.independent)


class S2FTRun:
    """S²FT on ``model`` for one fine-tuning run: select, co-permute, slice; :meth:`remove` fuses back.

    Args:
        model: a Llama / Mistral / Qwen, GPT-2 or BERT style model (:func:`~sparseforge.finetune.s2ft_blocks.find_blocks`).
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
                                  torch.Generator().manual_seed(seed), activations, config.independent)
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.orders: list[tuple[list[int] | None, list[int] | None]] = []
        self.slices: dict[str, SliceLinear] = {}
        self.step_count = 0
        model.requires_grad_(False)
        try:
            for block, pick in zip(self.blocks, self.picks):
                heads, head_spans = unit_layout(pick, "heads", config.parts)
                channels, channel_spans = unit_layout(pick, "channels", config.parts)
                kv_order = front_order(heads, block.kv_heads) if block.kv_heads else None
                channel_order = front_order(channels, block.channels) if block.channels else None
                permute_block_(block, kv_order, channel_order)
                self.orders.append((kv_order, channel_order))
                self._slice_block(block, {**head_spans, **channel_spans}, set(pruned))
        except BaseException:
            self.remove()
            raise

    def _slice_block(self, block: Block, spans: dict[str, tuple[int, int]], pruned: set[str]) -> None:
        """One :class:`SliceLinear` per trained module (``spans``: part -> first unit, units after the
        co-permutation); GPT-2's fused q/k/v: one range per part."""
        ranges: dict[str, list[tuple[int, int]]] = {}
        for part, (first, units) in spans.items():
            if units:
                proj, width = block.linear(part), unit_width(block, part)
                ranges.setdefault(proj.name, []).append((proj.start + first * width, units * width))
        for name, spans in ranges.items():
            module = self.model.get_submodule(name)
            axis = 0 if any(p in ROW_PARTS and block.linear_name(p) == name for p in self.config.parts) else 1
            masks = None
            if name in pruned:
                w = weight_2d(module)  # (out, in)
                masks = [w.narrow(axis, first, size) != 0 for first, size in spans]  # (size, in) or (out, size)
            layer = SliceLinear(module, axis, spans, masks)
            set_module(self.model, name, layer)
            self.slices[name] = layer

    def parameters(self) -> list[nn.Parameter]:
        """The trainable slices, in model order: all that the optimizer sees."""
        return [p for layer in self.slices.values() for p in layer.trainable]

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
        if state.get("selection") != self.selection():  # finetune_ then fuses and un-permutes (remove)
            raise ConfigError("the resumable state was made with another S²FT selection of heads and channels; "
                              "use another resume directory")
        self.step_count = int(state["step"])

    def remove(self) -> None:
        """Fuse: slices back into dense ``nn.Linear`` layers, the permutation undone, requires_grad restored."""
        for name, layer in self.slices.items():
            layer.apply_mask_()
            set_module(self.model, name, layer.fuse())
        self.slices = {}
        for block, (kv_order, channel_order) in zip(self.blocks, self.orders):
            permute_block_(block, inverse(kv_order) if kv_order else None,
                           inverse(channel_order) if channel_order else None)
        self.orders = []
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad.get(name, True))


def unit_layout(pick: dict[str, list[int]], structure: str, parts: tuple[str, ...]
                ) -> tuple[list[int], dict[str, tuple[int, int]]]:
    """The units of ``structure`` to move to the front, in order, and each trained part's span of them.

    Shared selection (``pick[structure]``): every part trains the first ``len`` units. Independent
    (``pick[structure + ":rows"]`` R and ``[":columns"]`` C): the order is ``[R - C, R & C, C - R]``
    (the reference's ``[only-v, both, only-o]``), rows train the first ``|R|`` units and columns the
    ``|C|`` units from ``|R - C|`` on: both contiguous.

    Returns:
        ``(front, {part: (first unit, units)})`` for the parts of ``structure`` in ``parts``.
    """
    members = [p for p in STRUCTURES[structure] if p in parts]
    if f"{structure}:rows" not in pick:
        shared = pick.get(structure, [])
        return list(shared), {p: (0, len(shared)) for p in members}
    rows, columns = pick[f"{structure}:rows"], pick[f"{structure}:columns"]
    only_rows = [u for u in rows if u not in set(columns)]
    both = [u for u in rows if u in set(columns)]
    only_columns = [u for u in columns if u not in set(rows)]
    spans = {p: (0, len(rows)) if p in ROW_PARTS else (len(only_rows), len(columns)) for p in members}
    return only_rows + both + only_columns, spans


def peek_batches(batches: Any, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of a finetune batch stream, leaving its generator where it was (the run sees the same data)."""
    state = batches.generator.get_state()
    try:
        return [batches.next() for _ in range(n)]
    finally:
        batches.generator.set_state(state)
