"""Where S²FT (Yang et al. 2024) selects: attention heads and FFN channels of transformer blocks.

Three block layouts are supported, each mapped to the parts ``q, k, v, o, up, gate, down``:

* Llama style (Llama, Mistral, Qwen2/3): ``self_attn.{q,k,v,o}_proj`` (optionally per-head-dim
  ``q_norm`` / ``k_norm``, as Qwen3) and ``mlp.{up,gate,down}_proj``;
* GPT-2: one fused ``attn.c_attn`` Conv1D whose output rows are q, k and v in turn,
  ``attn.c_proj`` (o), ``mlp.c_fc`` (up) and ``mlp.c_proj`` (down), weights stored transposed;
* BERT / MiniLM: ``attention.self.{query,key,value}``, ``attention.output.dense`` (o),
  ``intermediate.dense`` (up) and ``output.dense`` (down).

A part is a :class:`Proj`: a linear-like module and the output rows of it that the part owns (all
of them but for GPT-2's fused q/k/v), seen as an ``(out, in)`` weight view that writes through.
The attention unit is a key/value head together with the query heads that read it (grouped-query
attention), so a co-permutation of units keeps every query head on its own key/value head.

Example:
    >>> import transformers as t
    >>> cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    >>> blocks = find_blocks(t.LlamaForCausalLM(cfg), ("o", "down"))
    >>> len(blocks), blocks[0].kv_heads, blocks[0].group, blocks[0].head_dim
    (2, 2, 2, 8)
    >>> gpt2 = t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    >>> q = find_blocks(gpt2, ("q", "down"))[0].linear("q")
    >>> q.name, q.start, tuple(q.weight.shape)        # the first 32 rows of the fused c_attn
    ('transformer.h.0.attn.c_attn', 0, (32, 32))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparseforge.errors import ModelError
from sparseforge.finetune.s2ft_options import CHANNEL_PARTS, HEAD_PARTS
from sparseforge.layers import is_linear, weight_2d

__all__ = ["Block", "Proj", "find_blocks", "ROW_PARTS", "unit_width", "LAYOUTS"]

ROW_PARTS = ("q", "k", "v", "up", "gate")  # a unit is a block of output rows; o and down: input columns
_ATTN_EXTRA = ("q_norm", "k_norm")  # per-head-dim norms shared by all heads: a head permutation keeps them

# family -> (attention container, MLP container, part -> module path relative to the block); "qkv": fused q/k/v
LAYOUTS = {
    "llama": ("self_attn", "mlp", {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                                   "o": "self_attn.o_proj", "up": "mlp.up_proj", "gate": "mlp.gate_proj",
                                   "down": "mlp.down_proj"}),
    "gpt2": ("attn", "mlp", {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}),
    "bert": ("attention.self", "intermediate", {"q": "attention.self.query", "k": "attention.self.key",
                                                "v": "attention.self.value", "o": "attention.output.dense",
                                                "up": "intermediate.dense", "down": "output.dense"}),
}


@dataclass
class Proj:
    """One part's projection: ``module`` (``nn.Linear`` or ``Conv1D``) named ``name``, output rows ``[start, start + rows)``."""

    name: str
    module: nn.Module
    start: int = 0
    rows: int | None = None

    @property
    def in_features(self) -> int:
        return weight_2d(self.module).shape[1]

    @property
    def out_features(self) -> int:
        return weight_2d(self.module).shape[0] if self.rows is None else self.rows

    @property
    def weight(self) -> torch.Tensor:
        """``(out_features, in_features)`` view of the part's rows; writes go to the module."""
        return weight_2d(self.module)[self.start:self.start + self.out_features]

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        return None if b is None else b.data[self.start:self.start + self.out_features]


@dataclass
class Block:
    """One transformer block: its name, family, parts and head geometry."""

    name: str
    family: str
    parts: dict[str, Proj] = field(repr=False)
    heads: int
    kv_heads: int
    head_dim: int
    channels: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def linear(self, part: str) -> Proj | None:
        return self.parts.get(part)

    def linear_name(self, part: str) -> str:
        return self.parts[part].name

    def units(self, structure: str) -> int:
        return self.kv_heads if structure == "heads" else self.channels


def unit_width(block: Block, part: str) -> int:
    """Rows (q, k, v, up, gate) or columns (o, down) of ``part`` that one unit owns."""
    if part in ("q", "o"):
        return block.group * block.head_dim
    if part in ("k", "v"):
        return block.head_dim
    return 1


def _family(module: nn.Module) -> str | None:
    def has(path: str) -> bool:
        try:
            module.get_submodule(path)
            return True
        except AttributeError:
            return False

    if has("self_attn") and has("mlp"):
        return "llama"
    if has("attn.c_attn") and has("mlp.c_fc"):
        return "gpt2"
    if has("attention.self") and has("intermediate") and has("output.dense"):
        return "bert"
    return None


def _projections(name: str, block: nn.Module, family: str) -> dict[str, Proj]:
    """part -> :class:`Proj` of ``block``; GPT-2's fused ``c_attn`` split into its q, k and v rows."""
    out = {}
    for part, path in LAYOUTS[family][2].items():
        try:
            module = block.get_submodule(path)
        except AttributeError:
            continue
        if not is_linear(module):
            raise ModelError(f"S²FT needs {name}.{path} to be a linear layer, got {type(module).__name__}; "
                             "this architecture is not supported")
        if part != "qkv":
            out[part] = Proj(f"{name}.{path}", module)
            continue
        rows = weight_2d(module).shape[0]
        if rows % 3:
            raise ModelError(f"{name}.{path} has {rows} output rows, not q, k and v of equal size; S²FT cannot split it")
        for i, p in enumerate(("q", "k", "v")):
            out[p] = Proj(f"{name}.{path}", module, start=i * rows // 3, rows=rows // 3)
    return out


def _owned_only(name: str, container: nn.Module, container_path: str, modules: list[nn.Module], what: str,
                head_dim: int = 0) -> None:
    """Raise if ``container`` holds parameters outside ``modules`` (other than per-head-dim q/k norms)."""
    owned = {id(p) for m in modules for p in m.parameters()}
    for child_name, child in container.named_children():
        params = [p for p in child.parameters() if id(p) not in owned]
        if not params:
            continue
        if child_name in _ATTN_EXTRA and head_dim and all(p.shape == (head_dim,) for p in params):
            continue
        raise ModelError(f"{name}.{container_path}.{child_name} has parameters that S²FT cannot permute by {what}; "
                         "this block is not supported")
    if any(True for _ in container.parameters(recurse=False)):
        raise ModelError(f"{name}.{container_path} has its own parameters (e.g. attention sinks); S²FT cannot "
                         f"permute its {what}s")


def _attn_geometry(name: str, block: nn.Module, family: str, parts: dict[str, Proj], config) -> tuple[int, int, int]:
    if not all(p in parts for p in HEAD_PARTS):
        raise ModelError(f"S²FT needs q, k, v and o projections in {name}; this attention is not supported "
                         "(Llama, Mistral, Qwen, GPT-2 and BERT style blocks are)")
    q, k, v, o = (parts[p] for p in HEAD_PARTS)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads:
        raise ModelError("S²FT needs num_attention_heads in the model config to select heads")
    head_dim = getattr(config, "head_dim", None) or q.out_features // heads
    shapes_ok = (q.out_features == o.in_features == heads * head_dim and k.out_features == v.out_features
                 == kv_heads * head_dim and heads % kv_heads == 0)
    if not shapes_ok:
        raise ModelError(f"{name}: attention projection shapes do not match {heads} heads, {kv_heads} key/value heads "
                         f"of {head_dim}; S²FT cannot permute its heads")
    container_path = LAYOUTS[family][0]
    _owned_only(name, block.get_submodule(container_path), container_path,
                [p.module for p in (q, k, v, o)], "head", head_dim)
    return heads, kv_heads, head_dim


def _mlp_channels(name: str, block: nn.Module, family: str, parts: dict[str, Proj]) -> int:
    up, down, gate = (parts.get(p) for p in ("up", "down", "gate"))
    if up is None or down is None:
        raise ModelError(f"S²FT needs up and down projections in {name}; this MLP is not supported "
                         "(Llama, Mistral, Qwen, GPT-2 and BERT style MLPs are)")
    if up.out_features != down.in_features or (gate is not None and gate.out_features != up.out_features):
        raise ModelError(f"{name}: up/gate rows and down columns differ; S²FT cannot permute its channels")
    container_path = LAYOUTS[family][1]
    _owned_only(name, block.get_submodule(container_path), container_path,
                [p.module for p in (up, down, gate) if p is not None], "channel")
    return up.out_features


def find_blocks(model: nn.Module, parts: tuple[str, ...]) -> list[Block]:
    """Every block of ``model`` with the modules ``parts`` need, checked; raises ModelError if it has none or they differ."""
    config = getattr(model, "config", None)
    need_attn = any(p in HEAD_PARTS for p in parts)
    need_mlp = any(p in CHANNEL_PARTS for p in parts)
    if getattr(config, "add_cross_attention", False):
        raise ModelError("S²FT does not support cross-attention blocks (add_cross_attention=True)")
    blocks = []
    for name, module in model.named_modules():
        family = _family(module)
        if family is None:
            continue
        projs = _projections(name, module, family)
        heads = kv_heads = head_dim = channels = 0
        if need_attn:
            heads, kv_heads, head_dim = _attn_geometry(name, module, family, projs, config)
        if need_mlp:
            channels = _mlp_channels(name, module, family, projs)
        blocks.append(Block(name, family, projs, heads, kv_heads, head_dim, channels))
    if not blocks:
        raise ModelError("S²FT found no transformer block (Llama / Mistral / Qwen, GPT-2 or BERT style) in "
                         f"{type(model).__name__}; this architecture is not supported")
    for block in blocks:
        if "gate" in parts and block.linear("gate") is None:
            raise ModelError(f"{block.name} has no gate projection; drop 'gate' from the S²FT parts")
    return blocks
