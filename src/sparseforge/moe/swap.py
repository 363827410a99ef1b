"""Swap the MoE blocks of a whole transformers model for sparseforge's :class:`~sparseforge.moe.MoE`.

:func:`moe_` walks a loaded model, replaces every supported sparse-MoE block (Mixtral, PhiMoE,
Qwen2-MoE) by a :class:`MoEBlock` holding our layer with the same weights, in place, and returns a
:class:`MoESwapReport`. The model's outputs stay the same (tested on whole-model logits).

A decoder layer calls its MoE block as ``hidden = mlp(hidden)``; :class:`MoEBlock` keeps that
contract (it returns the tensor only). The auxiliary losses and routing statistics that our layer
returns per call are collected explicitly with :func:`collect_aux` (forward hooks, no state left
on the model)::

    with collect_aux(model) as auxes:
        logits = model(ids).logits
    loss = ce(logits) + sum(a.loss for _, a in auxes)

transformers' own ``output_router_logits`` records its router classes' outputs; those classes are
gone after the swap, so use :func:`collect_aux` instead.

Not carried over: training-time jitter that Mixtral (``router_jitter_noise``) and PhiMoE
(``input_jitter_noise``) apply to the experts' input (see :mod:`sparseforge.moe.hf`); eval
outputs are unaffected. ``save_pretrained`` writes our parameter names, which the original
architecture cannot load back; save with ``torch.save(model.state_dict())``.

Example:
    >>> from transformers import MixtralConfig, MixtralForCausalLM  # doctest: +SKIP
    >>> model = MixtralForCausalLM(MixtralConfig(hidden_size=32, num_hidden_layers=2))  # doctest: +SKIP
    >>> report = moe_(model)  # doctest: +SKIP
    >>> report.swapped  # doctest: +SKIP
    [('model.layers.0.mlp', 'mixtral'), ('model.layers.1.mlp', 'mixtral')]
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from sparseforge.errors import ModelError
from sparseforge.layers import set_module  # re-exported: moe modules import it from here
from sparseforge.moe.hf import from_mixtral_block, from_phimoe_block, from_qwen2_moe_block
from sparseforge.moe.layer import MoE
from sparseforge.moe.losses import MoEAux

__all__ = ["MoEBlock", "MoESwapReport", "moe_", "collect_aux", "set_module", "CONVERTERS"]

# transformers block class name -> (family, converter)
CONVERTERS: dict[str, tuple[str, Callable[..., MoE]]] = {
    "MixtralSparseMoeBlock": ("mixtral", from_mixtral_block),
    "PhimoeSparseMoeBlock": ("phimoe", from_phimoe_block),
    "Qwen2MoeSparseMoeBlock": ("qwen2_moe", from_qwen2_moe_block),
}


class MoEBlock(nn.Module):
    """Drop-in for a transformers MoE block: ``forward(hidden_states) -> hidden_states``.

    The wrapped :class:`MoE` is ``self.moe``; its ``aux`` of each call is dropped here (collect it
    with :func:`collect_aux`).
    """

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden_states)[0]


@dataclass
class MoESwapReport:
    """What :func:`moe_` replaced: ``(module name, family)`` pairs."""

    swapped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} MoE blocks"]
        lines += [f"  {name}: {family}" for name, family in self.swapped]
        return "\n".join(lines)


def _looks_like_moe(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith(("SparseMoeBlock", "MoeBlock", "MoEBlock")) and not isinstance(module, MoEBlock)


def moe_(model: nn.Module, **moe_kwargs) -> MoESwapReport:
    """Replace every supported transformers MoE block of ``model`` by a :class:`MoEBlock`, in place.

    Args:
        model: a transformers model (or any module) holding Mixtral / PhiMoE / Qwen2-MoE blocks.
        moe_kwargs: passed to every converter, e.g. ``backend="loop"``, ``capacity_factor=1.25``,
            ``lb_coef=0.02``.
    Returns:
        :class:`MoESwapReport`.
    Raises:
        ModelError: the model has no MoE block, or has an MoE-like block of an unsupported family
            (nothing is swapped then: all blocks are converted before any is replaced).
    """
    built: dict[str, tuple[str, MoEBlock]] = {}
    unsupported = []
    for name, module in model.named_modules():
        kind = CONVERTERS.get(type(module).__name__)
        if kind is not None:
            family, convert = kind
            block = MoEBlock(convert(module, **moe_kwargs)).train(module.training)  # keep eval/train mode
            built[name] = (family, block)
        elif _looks_like_moe(module):
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ModelError(
            f"unsupported MoE blocks: {', '.join(unsupported)}; moe_ converts {sorted(CONVERTERS)}"
        )
    if not built:
        raise ModelError(
            f"{type(model).__name__} has no MoE block to swap (looked for {sorted(CONVERTERS)}); "
            "to turn a dense model's MLPs into MoE layers use sparseforge.moe.upcycle_"
        )
    report = MoESwapReport()
    for name, (family, block) in built.items():
        if name == "":
            raise ModelError("the model itself is an MoE block; convert it with sparseforge.moe.hf instead")
        set_module(model, name, block)
        report.swapped.append((name, family))
    return report


@contextmanager
def collect_aux(model: nn.Module) -> Iterator[list[tuple[str, MoEAux]]]:
    """Collect ``(module name, aux)`` of every :class:`MoE` call inside ``model`` while in the block.

    The hooks are removed on exit; the list is the caller's.
    """
    collected: list[tuple[str, MoEAux]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            def hook(mod, args, output, _name=name):
                collected.append((_name, output[1]))

            handles.append(module.register_forward_hook(hook))
    try:
        yield collected
    finally:
        for h in handles:
            h.remove()
