"""Sparse upcycling (Komatsuzaki et al., *Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints*, 2022): turn the gated MLPs of a dense model into MoE layers initialised from them.

Every expert of an upcycled layer is an exact copy of the dense MLP; the router is the one new
part and is initialised at random (zero-mean normal, std ``router_std``; the paper states only
that the router is newly initialised, 0.02 is the initializer scale of the T5 / Llama code bases).
All other weights are untouched. With softmax top-k routing renormalised over the chosen experts
(the default) the gate weights of every token sum to one, so at initialisation the upcycled
model computes exactly the dense function: ``sum_i w_i * MLP(x) = MLP(x)``. Routers whose weights
do not sum to one (``renormalize=False``, switch, SparseMixer in training, a capacity factor that
drops tokens) scale or drop the dense output instead; training then adapts (the paper trains
on). The paper upcycles every other MLP layer by default: ``layers="every_other"``.

Supported MLPs: Llama-style ``gate_proj``, ``up_proj``, ``down_proj`` linears without biases
(``down(act(gate(x)) * up(x))``: Llama, Mistral, Qwen2, the built-in model).

Example:
    >>> from sparseforge.io.models import load_model  # doctest: +SKIP
    >>> model = load_model("builtin").model  # doctest: +SKIP
    >>> report = upcycle_(model, num_experts=8, k=2, seed=0)  # doctest: +SKIP
    >>> len(report.upcycled)  # doctest: +SKIP
    6
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.moe.hf import ACTIVATIONS
from sparseforge.moe.layer import MoE
from sparseforge.moe.swap import MoEBlock, set_module

__all__ = ["upcycle_mlp", "upcycle_", "UpcycleReport", "gated_mlps"]

_PROJ = ("gate_proj", "up_proj", "down_proj")


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in _PROJ)


def gated_mlps(model: nn.Module) -> list[str]:
    """Names of the Llama-style gated MLPs of ``model``, in model order."""
    return [name for name, m in model.named_modules() if _is_gated_mlp(m)]


def _activation(mlp: nn.Module, default: str | None) -> str:
    act = getattr(getattr(mlp, "config", None), "hidden_act", None) or default
    if act is None:
        raise ModelError(f"cannot tell the activation of {type(mlp).__name__}; pass activation='silu' (or gelu, ...)")
    if act not in ACTIVATIONS:
        raise ModelError(f"MLP activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def upcycle_mlp(
    mlp: nn.Module,
    num_experts: int = 8,
    k: int = 2,
    *,
    router_std: float = 0.02,
    seed: int | None = 0,
    activation: str | None = None,
    **moe_kwargs,
) -> MoE:
    """An :class:`MoE` whose ``num_experts`` experts are copies of the gated ``mlp``.

    ``router_std``: std of the new router's normal init (``seed`` seeds it; ``None``: torch's
    default generator). ``moe_kwargs`` go to :class:`MoE` (default router: softmax top-k,
    renormalised). The layer is in the mode (train/eval) of ``mlp``.
    """
    if not _is_gated_mlp(mlp):
        raise ModelError(f"{type(mlp).__name__} is not a gated MLP with gate_proj / up_proj / down_proj linears")
    if any(getattr(mlp, n).bias is not None for n in _PROJ):
        raise ModelError("the MLP has biases (mlp_bias=True); sparseforge's MoE experts have none")
    if not router_std >= 0.0:
        raise ConfigError(f"router_std must be >= 0, got {router_std!r}")
    act = activation or _activation(mlp, None)
    w_gate = mlp.gate_proj.weight.detach().t()  # (d, h)
    w_up = mlp.up_proj.weight.detach().t()  # (d, h)
    w_down = mlp.down_proj.weight.detach().t()  # (h, d)
    d, h = w_up.shape
    E = num_experts
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    router = torch.randn(E, d, generator=gen, dtype=torch.float32) * router_std  # (E, d)
    moe = MoE.from_weights(
        router.to(w_up), w_up.expand(E, d, h), w_down.expand(E, h, d), w_gate.expand(E, d, h),
        k=k, activation=act, **moe_kwargs,
    )
    return moe.train(mlp.training)


@dataclass
class UpcycleReport:
    """Module names turned into MoE layers, and the gated MLPs left dense."""

    upcycled: list[str] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)


def upcycle_(
    model: nn.Module,
    num_experts: int = 8,
    k: int = 2,
    *,
    layers: "None | str | list[int]" = None,
    router_std: float = 0.02,
    seed: int = 0,
    **moe_kwargs,
) -> UpcycleReport:
    """Replace the gated MLPs of ``model`` by upcycled MoE layers (:class:`MoEBlock`), in place.

    Args:
        num_experts, k: experts per layer and per token.
        layers: ``None`` = every gated MLP; ``"every_other"`` = the 2nd, 4th, ... (the paper's
            default: half of the MLP layers); a list of indices into the model's gated MLPs.
        router_std, seed: new router init; layer ``i`` uses ``seed + i`` (no two routers equal).
        moe_kwargs: passed to :class:`MoE` (``router=``, ``router_options=``, ``capacity_factor=`` ...).
    """
    names = gated_mlps(model)
    if not names:
        raise ModelError(
            f"{type(model).__name__} has no Llama-style gated MLP (gate_proj / up_proj / down_proj) to upcycle"
        )
    if layers is None:
        chosen = list(range(len(names)))
    elif layers == "every_other":
        chosen = list(range(1, len(names), 2))
    elif isinstance(layers, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        bad = [i for i in layers if not 0 <= i < len(names)]
        if bad:
            raise ConfigError(f"layers {bad} out of range: the model has {len(names)} gated MLPs (0..{len(names) - 1})")
        chosen = sorted(set(layers))
    else:
        raise ConfigError(f"layers must be None, 'every_other' or a list of MLP indices, got {layers!r}")
    default_act = getattr(getattr(model, "config", None), "hidden_act", None)
    act_given = moe_kwargs.pop("activation", None)
    built = {}
    for i in chosen:
        mlp = model.get_submodule(names[i])
        act = act_given or _activation(mlp, default_act)
        moe = upcycle_mlp(mlp, num_experts, k, router_std=router_std, seed=seed + i, activation=act, **moe_kwargs)
        built[names[i]] = MoEBlock(moe).train(mlp.training)
    for name, block in built.items():
        set_module(model, name, block)
    return UpcycleReport(upcycled=list(built), kept_dense=[n for i, n in enumerate(names) if i not in chosen])
