"""The S²FT co-permutation (Yang et al. 2024): the selected heads / channels of a block first, same function.

Heads: the key/value heads go in the order ``kv_order`` (rows of k_proj and v_proj, in blocks of
``head_dim``), each carrying its group of query heads (rows of q_proj, columns of o_proj, in blocks
of ``group * head_dim``), so every query head still reads its own key/value head and o_proj still
sums the same products: the block computes the same function. Channels: up/gate rows and down
columns in the order ``channel_order``. Biases of the permuted rows move with them. GPT-2's fused
``c_attn`` is permuted within each of its q, k and v row ranges; Conv1D weights through their
``(out, in)`` view. After the
permutation the selected units are the first rows/columns: contiguous dense slices.

Example:
    >>> import torch, transformers as t
    >>> from sparseforge.finetune.s2ft_blocks import find_blocks
    >>> cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    >>> model = t.LlamaForCausalLM(cfg).eval()
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> before = model(ids).logits
    >>> block = find_blocks(model, ("o", "down"))[0]
    >>> permute_block_(block, front_order([1], 2), front_order([5, 9], 64))
    >>> torch.allclose(model(ids).logits, before, atol=1e-5)
    True
"""

from __future__ import annotations

import torch

from sparseforge.finetune.s2ft_blocks import Block, Proj

__all__ = ["front_order", "inverse", "permute_block_"]


def front_order(selected: list[int], units: int) -> list[int]:
    """The permutation that puts ``selected`` (in their order) first, then the other units in order."""
    chosen = set(selected)
    return list(selected) + [u for u in range(units) if u not in chosen]


def inverse(order: list[int]) -> list[int]:
    out = [0] * len(order)
    for new, old in enumerate(order):
        out[old] = new
    return out


def _expand(order: list[int], width: int) -> torch.Tensor:
    """Unit order -> ``(len(order) * width,)`` row/column index: unit u owns ``[u*width, (u+1)*width)``."""
    base = torch.tensor(order, dtype=torch.long)[:, None] * width  # (units, 1)
    return (base + torch.arange(width)).reshape(-1)


@torch.no_grad()
def _take_rows_(proj: Proj, index: torch.Tensor) -> None:
    w = proj.weight  # (out, in) view of the part's rows
    w.copy_(w[index])
    if proj.bias is not None:
        proj.bias.copy_(proj.bias[index])


@torch.no_grad()
def _take_columns_(proj: Proj, index: torch.Tensor) -> None:
    w = proj.weight  # (out, in) view; the bias is per output
    w.copy_(w[:, index])


def permute_block_(block: Block, kv_order: list[int] | None, channel_order: list[int] | None) -> None:
    """Reorder ``block``'s heads by ``kv_order`` (key/value heads) and FFN channels by ``channel_order``, in place."""
    if kv_order is not None:
        kv = _expand(kv_order, block.head_dim)  # (kv_heads * head_dim,)
        q = _expand(kv_order, block.group * block.head_dim)  # (heads * head_dim,)
        _take_rows_(block.linear("q"), q)
        _take_rows_(block.linear("k"), kv)
        _take_rows_(block.linear("v"), kv)
        _take_columns_(block.linear("o"), q)
    if channel_order is not None:
        index = torch.tensor(channel_order, dtype=torch.long)
        _take_rows_(block.linear("up"), index)
        if block.linear("gate") is not None:
            _take_rows_(block.linear("gate"), index)
        _take_columns_(block.linear("down"), index)
