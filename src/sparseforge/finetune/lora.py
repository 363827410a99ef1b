"""LoRA adapters on a frozen (possibly pruned) base, through ``peft``, and a merge that keeps the mask.

:func:`attach_lora` injects ``peft`` LoRA layers in place (``peft.inject_adapter_in_model``: the
model keeps its class, forward and ``generate``; parameter names gain ``base_layer`` /
``lora_A.default`` / ``lora_B.default``), freezes everything else and returns the adapted layer
names. :func:`merge_lora_` folds every adapter back into its base weight and puts the plain base
layer back; for a pruned layer the delta ``scaling * B @ A`` is multiplied by the layer's mask
(``weight != 0``) first, so zeros stay zero and an N:M layer stays N:M. ``keep_mask=False`` adds
the dense delta instead (the model is then dense). :func:`masked_delta` is that rule as a tensor
function.

``peft`` is an optional dependency (``pip install 'sparseforge[finetune]'``), imported on first use.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with torch.no_grad():
    ...     net[0].weight[:, :4] = 0                     # a pruned layer
    >>> attach_lora(net, rank=2)                          # doctest: +SKIP
    ['0', '2']
    >>> merge_lora_(net)                                  # doctest: +SKIP
    ['0', '2']
    >>> bool((net[0].weight[:, :4] == 0).all())           # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.layers import is_linear, set_module

__all__ = ["attach_lora", "merge_lora_", "remove_lora_", "lora_layers", "masked_delta", "adaptable_layers", "import_peft"]

ADAPTER = "default"


def import_peft():
    """The ``peft`` module, or a one-line error naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA adapters need the peft library: pip install 'sparseforge[finetune]' (or pip install peft)") from None
    return peft


def adaptable_layers(model: nn.Module) -> list[str]:
    """Names of the linear layers LoRA adapts: every ``nn.Linear`` / Conv1D except the output embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if name and is_linear(module) and module is not head]


def attach_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                targets: Iterable[str] | None = None) -> list[str]:
    """Inject LoRA adapters (``peft``) into ``model`` in place; freeze every other parameter.

    Args:
        model: the base model (its weights are frozen, pruned or not).
        rank: LoRA rank ``r`` (> 0). alpha: the scale numerator (``scaling = alpha / r``; default ``2 r``).
        dropout: dropout on the adapter input. targets: layer names (default :func:`adaptable_layers`).

    Returns:
        The adapted layer names, in model order.

    Raises:
        ConfigError: rank <= 0, a negative alpha, dropout outside [0, 1), peft missing.
        ModelError: no linear layer to adapt, or the model already carries adapters.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"lora rank must be a positive integer, got {rank!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ConfigError(f"lora alpha must be a positive number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ConfigError(f"lora dropout must be in [0, 1), got {dropout!r}")
    if lora_layers(model):
        raise ModelError("the model already carries LoRA adapters; merge them first (merge_lora_) or load the base model")
    names = list(targets) if targets is not None else adaptable_layers(model)
    if not names:
        raise ModelError(f"{type(model).__name__} has no linear layer for LoRA to adapt; give a model with nn.Linear layers")
    peft = import_peft()
    modules = dict(model.named_modules())
    transposed = all(not isinstance(modules[n], nn.Linear) for n in names if n in modules)  # Conv1D stores (in, out)
    config = peft.LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else 2 * rank), lora_dropout=float(dropout),
                             target_modules=names, bias="none", fan_in_fan_out=transposed)
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    layers = lora_layers(model)
    for layer in layers.values():
        for param in (*layer.lora_A[ADAPTER].parameters(), *layer.lora_B[ADAPTER].parameters()):
            param.requires_grad_(True)
    return list(layers)


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """``{name: peft LoraLayer}`` of ``model`` (empty when peft is not installed or nothing is adapted)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def masked_delta(weight: torch.Tensor, delta: torch.Tensor, keep_mask: bool = True) -> torch.Tensor:
    """The update a merge adds to ``weight``: ``delta`` where ``weight != 0`` (``keep_mask``), else ``delta``.

    Both tensors share one layout (``(out, in)`` for ``nn.Linear``).
    """
    if weight.shape != delta.shape:
        raise ModelError(f"adapter delta {tuple(delta.shape)} does not match its weight {tuple(weight.shape)}")
    return delta * (weight != 0).to(delta.dtype) if keep_mask else delta


def merge_lora_(model: nn.Module, keep_mask: bool = True, pruned: Iterable[str] | None = None,
                min_sparsity: float = 0.1) -> list[str]:
    """Fold every LoRA adapter of ``model`` into its base weight and remove the adapter layers.

    Args:
        keep_mask: a pruned layer gets the masked delta (its zeros stay zero); False adds the dense delta.
        pruned: the names of the pruned layers (default: layers whose base weight has at least
            ``min_sparsity`` exact zeros).

    Returns:
        The merged layer names.
    """
    merged = []
    pruned = set(pruned) if pruned is not None else None
    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        weight = base.weight.data  # storage layout; the delta comes in the same layout
        is_pruned = float((weight == 0).float().mean()) >= min_sparsity if pruned is None else name in pruned
        with torch.no_grad():
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    delta = layer.get_delta_weight(adapter).to(weight.dtype)
                    weight.add_(masked_delta(weight, delta, keep_mask and is_pruned))
        set_module(model, name, base)
        merged.append(name)
    _forget_peft_config(model)
    return merged


def remove_lora_(model: nn.Module) -> list[str]:
    """Remove every LoRA adapter of ``model`` without merging (the base layers come back unchanged)."""
    names = list(lora_layers(model))
    for name in names:
        set_module(model, name, model.get_submodule(name).get_base_layer())
    _forget_peft_config(model)
    return names


def _forget_peft_config(model: nn.Module) -> None:
    """Drop the ``peft_config`` attribute ``inject_adapter_in_model`` set, once no adapter is left."""
    if "peft_config" in vars(model) and not lora_layers(model):
        del model.peft_config
