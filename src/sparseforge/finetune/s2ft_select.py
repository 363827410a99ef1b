"""S²FT selection (Yang et al. 2024): how many heads and channels the budget buys, and which ones.

The budget (a parameter count) is spread over the selection groups (one per structure, or with
``independent`` one per side -- rows or columns -- of each structure) in proportion to the
parameters of their trained parts, then the parameters a rounding down leaves are filled with the cheaper
unit. Units are picked across all blocks at once: at random (the paper's default, sampled over all
blocks as the reference does) or by the largest score, each block's scores divided by their mean so
that blocks of different scale compete fairly. Scores: ``"weight"`` = the squared norm of the
unit's weights in the trained parts; ``"activation"`` = the mean |input| of the unit into o_proj
(its query heads' outputs) or down_proj (its channel) over calibration batches.

Example:
    >>> import torch, transformers as t
    >>> from sparseforge.finetune.s2ft_blocks import find_blocks
    >>> cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    >>> blocks = find_blocks(t.LlamaForCausalLM(cfg), ("o", "down"))
    >>> picks = select_units(blocks, ("o", "down"), 2000, "random", torch.Generator().manual_seed(0))
    >>> sum(len(p["heads"]) * 16 * 32 + len(p["channels"]) * 32 for p in picks) <= 2000
    True
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from sparseforge.errors import ConfigError
from sparseforge.finetune.s2ft_blocks import ROW_PARTS, Block, unit_width
from sparseforge.finetune.s2ft_options import CHANNEL_PARTS, HEAD_PARTS

__all__ = ["unit_cost", "allocate", "unit_scores", "activation_scores", "select_units", "STRUCTURES", "groups"]

STRUCTURES = {"heads": HEAD_PARTS, "channels": CHANNEL_PARTS}


def groups(parts: tuple[str, ...], independent: bool = False) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Selection groups ``{name: (structure, trained parts)}``: the units of a group are drawn together.

    Shared (default): one group per structure (``"heads"``, ``"channels"``) for all its trained parts.
    ``independent``: the row parts (q, k, v / up, gate) and the column part (o / down) of a structure
    draw separately (``"heads:rows"``, ``"heads:columns"``, ...), as the reference samples v and o,
    and up and down, independently; a structure with only one side trained keeps its plain name.
    """
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for structure, members in STRUCTURES.items():
        trained = tuple(p for p in members if p in parts)
        rows = tuple(p for p in trained if p in ROW_PARTS)
        columns = tuple(p for p in trained if p not in ROW_PARTS)
        if independent and rows and columns:
            out[f"{structure}:rows"] = (structure, rows)
            out[f"{structure}:columns"] = (structure, columns)
        elif trained:
            out[structure] = (structure, trained)
    return out


def unit_cost(block: Block, parts: tuple[str, ...], structure: str) -> int:
    """Trainable parameters of one unit of ``structure`` in ``block`` over the trained ``parts``."""
    cost = 0
    for part in parts:
        if part in STRUCTURES[structure]:
            linear = block.linear(part)
            other = linear.in_features if part in ROW_PARTS else linear.out_features
            cost += unit_width(block, part) * other
    return cost


def allocate(blocks: list[Block], parts: tuple[str, ...], budget: int, independent: bool = False) -> dict[str, int]:
    """Units per selection group (:func:`groups`, summed over blocks) that fit ``budget`` parameters.

    Raises ConfigError if none fits.
    """
    cost, total = {}, {}
    for name, (structure, members) in groups(parts, independent).items():
        costs = {unit_cost(b, members, structure) for b in blocks}
        if costs != {0}:
            if len(costs) != 1:
                raise ConfigError("S²FT needs blocks of one shape (the same heads and channels in every block)")
            cost[name] = costs.pop()
            total[name] = sum(b.units(structure) for b in blocks)
    capacity = sum(cost[s] * total[s] for s in cost)
    if budget > capacity:
        raise ConfigError(f"S²FT budget of {budget} parameters exceeds the {capacity} of the parts "
                          f"{','.join(parts)}; lower the budget or add parts")
    ratio = budget / capacity
    count = {s: min(total[s], math.floor(ratio * total[s])) for s in cost}
    for s in sorted(cost, key=lambda s: cost[s]):  # fill what the rounding left with the cheaper unit first
        left = budget - sum(cost[t] * count[t] for t in cost)
        count[s] = min(total[s], count[s] + left // cost[s])
    if not any(count.values()):
        cheapest = min(cost.values())
        raise ConfigError(f"S²FT budget of {budget} parameters is smaller than one unit ({cheapest} parameters); "
                          "raise the budget")
    return count


def unit_scores(block: Block, parts: tuple[str, ...], structure: str) -> torch.Tensor:
    """``(units,)`` squared weight norm of each unit of ``block`` over the trained ``parts`` of ``structure``."""
    score = torch.zeros(block.units(structure))
    for part in parts:
        if part not in STRUCTURES[structure]:
            continue
        w = block.linear(part).weight.detach().float()  # (out, in)
        w = w if part in ROW_PARTS else w.t()  # (unit rows, other)
        score += w.reshape(block.units(structure), -1).pow(2).sum(1)
    return score


@torch.no_grad()
def activation_scores(model: torch.nn.Module, blocks: list[Block], structure: str,
                      batches: Iterable[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per block, ``(units,)`` mean |input| of each unit into o_proj (heads) or down_proj (channels) over ``batches``."""
    part = "o" if structure == "heads" else "down"
    sums = [torch.zeros(b.units(structure)) for b in blocks]
    counts = [0]
    keep: list[torch.Tensor] = []  # (B, T) the current batch's attention mask

    def hook_for(i: int, block: Block) -> Callable:
        def hook(_module, args):
            x = args[0].detach().float()  # (B, T, in)
            x = x[keep[0].bool()] if keep and keep[0].shape == x.shape[:2] else x.reshape(-1, x.shape[-1])  # (N, in)
            sums[i].add_(x.abs().sum(0).reshape(block.units(structure), -1).sum(1))

        return hook

    handles = [b.linear(part).module.register_forward_pre_hook(hook_for(i, b)) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            keep[:] = [batch["attention_mask"]] if "attention_mask" in batch else []
            counts[0] += int(batch["attention_mask"].sum()) if keep else int(batch["input_ids"].numel())
            kwargs = dict(batch, use_cache=False) if hasattr(model, "get_output_embeddings") else dict(batch)
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [s / max(counts[0], 1) for s in sums]


def _normalised(scores: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([s / s.mean().clamp_min(1e-30) for s in scores])  # (total units,)


def select_units(blocks: list[Block], parts: tuple[str, ...], budget: int, select: str,
                 generator: torch.Generator, activations: dict[str, list[torch.Tensor]] | None = None,
                 independent: bool = False) -> list[dict[str, list[int]]]:
    """Per block, ``{group: [...]}`` (:func:`groups`, e.g. ``"heads"``, ``"channels"``): the sorted units
    to train, within ``budget`` parameters.

    ``select`` is ``"random"``, ``"weight"`` or ``"activation"`` (then ``activations[structure]`` holds
    per-block scores from :func:`activation_scores`).
    """
    count = allocate(blocks, parts, budget, independent)
    found = groups(parts, independent)
    picks: list[dict[str, list[int]]] = [{"heads": [], "channels": []} if not independent else
                                         {name: [] for name in found} for _ in blocks]
    for name, n in count.items():
        structure, members = found[name]
        sizes = [b.units(structure) for b in blocks]
        if select == "random":
            flat = torch.randperm(sum(sizes), generator=generator)[:n]
        else:
            per_block = activations[structure] if select == "activation" else \
                [unit_scores(b, members, structure) for b in blocks]
            flat = torch.topk(_normalised(per_block), n, sorted=False).indices
        offsets = torch.tensor([0] + sizes).cumsum(0)
        for i in range(len(blocks)):
            mine = flat[(flat >= offsets[i]) & (flat < offsets[i + 1])] - offsets[i]
            picks[i][name] = sorted(int(u) for u in mine)
    return picks

