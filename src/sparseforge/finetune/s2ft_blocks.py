"""Where S²FT (Yang et al. 2024) selects: attention heads and FFN channels of Llama-style blocks.

A block is supported when its ``self_attn`` has ``q_proj, k_proj, v_proj, o_proj`` linear layers
(optionally per-head-dim ``q_norm`` / ``k_norm``, as Qwen3) and its ``mlp`` has ``up_proj, down_proj``
(and ``gate_proj``) and nothing else with parameters: Llama, Mistral, Qwen2/3 and their kin. The
attention unit is a key/value head together with the query heads that read it (grouped-query
attention), so a co-permutation of units keeps every query head on its own key/value head.

Example:
    >>> import transformers as t
    >>> cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    >>> blocks = find_blocks(t.LlamaForCausalLM(cfg), ("o", "down"))
    >>> len(blocks), blocks[0].kv_heads, blocks[0].group, blocks[0].head_dim
    (2, 2, 2, 8)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparseforge.errors import ModelError
from sparseforge.finetune.s2ft_options import CHANNEL_PARTS, HEAD_PARTS

__all__ = ["Block", "find_blocks", "PROJ", "ROW_PARTS", "unit_width"]

PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "up": "up_proj", "gate": "gate_proj",
        "down": "down_proj"}
ROW_PARTS = ("q", "k", "v", "up", "gate")  # a unit is a block of output rows; o and down: input columns
_ATTN_EXTRA = ("q_norm", "k_norm")  # per-head-dim norms shared by all heads: a head permutation keeps them


@dataclass
class Block:
    """One transformer block: its name, attention and MLP modules and head geometry."""

    name: str
    attn: nn.Module
    mlp: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    channels: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def linear(self, part: str) -> nn.Linear | None:
        owner = self.attn if part in HEAD_PARTS else self.mlp
        return getattr(owner, PROJ[part], None)

    def linear_name(self, part: str) -> str:
        owner = "self_attn" if part in HEAD_PARTS else "mlp"
        return f"{self.name}.{owner}.{PROJ[part]}"

    def units(self, structure: str) -> int:
        return self.kv_heads if structure == "heads" else self.channels


def unit_width(block: Block, part: str) -> int:
    """Rows (q, k, v, up, gate) or columns (o, down) of ``part`` that one unit owns."""
    if part in ("q", "o"):
        return block.group * block.head_dim
    if part in ("k", "v"):
        return block.head_dim
    return 1


def _attn_geometry(name: str, attn: nn.Module, config) -> tuple[int, int, int]:
    q, k, v, o = (getattr(attn, PROJ[p], None) for p in HEAD_PARTS)
    if not all(isinstance(m, nn.Linear) for m in (q, k, v, o)):
        raise ModelError(f"S²FT needs q_proj, k_proj, v_proj and o_proj linear layers in {name}.self_attn; "
                         "this architecture is not supported (Llama, Mistral and Qwen style blocks are)")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads:
        raise ModelError("S²FT needs num_attention_heads in the model config to select heads")
    head_dim = getattr(config, "head_dim", None) or q.out_features // heads
    shapes_ok = (q.out_features == o.in_features == heads * head_dim and k.out_features == v.out_features
                 == kv_heads * head_dim and heads % kv_heads == 0)
    if not shapes_ok:
        raise ModelError(f"{name}.self_attn: projection shapes do not match {heads} heads, {kv_heads} key/value heads "
                         f"of {head_dim}; S²FT cannot permute its heads")
    for child_name, child in attn.named_children():
        if child_name in PROJ.values() or not any(True for _ in child.parameters()):
            continue
        if child_name not in _ATTN_EXTRA or any(p.shape != (head_dim,) for p in child.parameters()):
            raise ModelError(f"{name}.self_attn.{child_name} has parameters that S²FT cannot permute by head; "
                             "this attention is not supported")
    if any(True for _ in attn.parameters(recurse=False)):
        raise ModelError(f"{name}.self_attn has its own parameters (e.g. attention sinks); S²FT cannot permute its heads")
    return heads, kv_heads, head_dim


def _mlp_channels(name: str, mlp: nn.Module) -> int:
    up, down, gate = (getattr(mlp, PROJ[p], None) for p in ("up", "down", "gate"))
    if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear) or (gate is not None and not isinstance(gate, nn.Linear)):
        raise ModelError(f"S²FT needs up_proj and down_proj linear layers in {name}.mlp; this MLP is not supported "
                         "(Llama, Mistral and Qwen style MLPs are)")
    if up.out_features != down.in_features or (gate is not None and gate.out_features != up.out_features):
        raise ModelError(f"{name}.mlp: up/gate rows and down columns differ; S²FT cannot permute its channels")
    for child_name, child in mlp.named_children():
        if child_name not in ("up_proj", "down_proj", "gate_proj") and any(True for _ in child.parameters()):
            raise ModelError(f"{name}.mlp.{child_name} has parameters that S²FT cannot permute by channel")
    return up.out_features


def find_blocks(model: nn.Module, parts: tuple[str, ...]) -> list[Block]:
    """Every block of ``model`` with the modules ``parts`` need, checked; raises ModelError if it has none or they differ."""
    config = getattr(model, "config", None)
    need_attn = any(p in HEAD_PARTS for p in parts)
    need_mlp = any(p in CHANNEL_PARTS for p in parts)
    blocks = []
    for name, module in model.named_modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if not isinstance(attn, nn.Module) or not isinstance(mlp, nn.Module):
            continue
        heads = kv_heads = head_dim = channels = 0
        if need_attn:
            heads, kv_heads, head_dim = _attn_geometry(name, attn, config)
        if need_mlp:
            channels = _mlp_channels(name, mlp)
        blocks.append(Block(name, attn, mlp, heads, kv_heads, head_dim, channels))
    if not blocks:
        raise ModelError("S²FT found no transformer block with self_attn and mlp modules; it supports Llama, Mistral "
                         f"and Qwen style models, not {type(model).__name__}")
    for block in blocks:
        if "gate" in parts and block.linear("gate") is None:
            raise ModelError(f"{block.name}.mlp has no gate_proj; drop 'gate' from the S²FT parts")
    return blocks
