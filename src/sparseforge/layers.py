"""Find what to prune in any model: linear-like layers and the repeated transformer blocks.

No per-family files: the block list is found generically as the largest ``nn.ModuleList`` whose
children all share one class and hold linear layers (``model.layers`` in Llama/Qwen2/Mistral,
``transformer.h`` in GPT-2, ``decoder.layers`` in OPT, ``gpt_neox.layers``, ``encoder.layer`` in
BERT). Linear-like layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), whose weight is
stored transposed; :func:`weight_2d` hides that by returning an ``(out, in)`` view.

Example:
    >>> import torch.nn as nn
    >>> from sparseforge.layers import find_blocks, linear_layers
    >>> net = nn.Sequential(nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)]))
    >>> name, blocks = find_blocks(net)
    >>> name, len(blocks)
    ('0', 3)
    >>> list(linear_layers(blocks[0]))
    ['0']
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from sparseforge.config import name_matches
from sparseforge.errors import ConfigError, ModelError

__all__ = ["set_module", "is_linear", "weight_2d", "linear_layers", "linear_weights", "find_blocks", "select_targets"]


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (checked by name: transformers stays optional)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as an ``(out_features, in_features)`` view that writes through to the module."""
    if isinstance(module, nn.Linear):
        return module.weight.data  # (out, in)
    if is_linear(module):
        return module.weight.data.t()  # Conv1D stores (in, out)
    raise ModelError(f"{type(module).__name__} is not a linear layer")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace submodule ``name`` (dotted) of ``model`` by ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def linear_layers(root: nn.Module, prefix: str = "") -> Iterator[str]:
    """Names (relative to ``root``, prefixed with ``prefix``) of its linear-like submodules."""
    for name, module in root.named_modules():
        if name and is_linear(module):
            yield f"{prefix}{name}"


def linear_weights(model: nn.Module) -> dict[str, bool]:
    """``{param name: transposed}`` for every nn.Linear (False) / transformers Conv1D (True) weight."""
    return {
        f"{name}.weight": not isinstance(mod, nn.Linear)
        for name, mod in model.named_modules()
        if name and is_linear(mod)
    }


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated block list: the largest ModuleList of same-class children holding linears."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(True for _ in linear_layers(module[0])):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ModelError(
            f"could not find a list of repeated transformer blocks in {type(model).__name__}; "
            "calibration-based methods need one (use method 'magnitude', or pass an explicit model)"
        )
    return best[1], best[2]


def select_targets(
    model: nn.Module, targets: list[str] | None, ignore: list[str], block_prefix: str | None
) -> list[str]:
    """Names of the linear layers to prune, in model order.

    ``targets=None`` selects every linear layer inside the repeated blocks (``block_prefix``).
    ``ignore`` wins over ``targets``. A target pattern that matches no linear layer is an error,
    so typos never silently prune nothing.
    """
    names = list(linear_layers(model))
    if targets is None:
        if block_prefix is None:
            raise ModelError("no repeated transformer blocks found; name the layers to prune in 'targets'")
        chosen = [n for n in names if n.startswith(block_prefix + ".")]
    else:
        for pattern in targets:
            if not any(name_matches(n, pattern) for n in names):
                raise ConfigError(
                    f"target pattern {pattern!r} matches no linear layer; examples of layer names: {names[:4]}"
                )
        chosen = [n for n in names if any(name_matches(n, p) for p in targets)]
    chosen = [n for n in chosen if not any(name_matches(n, p) for p in ignore)]
    if not chosen:
        raise ConfigError("targets and ignore leave no layer to prune; check the patterns")
    return chosen
