"""Build an :class:`~sparseforge.moe.MoE` from a transformers MoE block (same weights, same outputs).

Duck-typed on the block's attributes, so this module never imports transformers. Supported:
``MixtralSparseMoeBlock`` (softmax top-k, renormalised), ``PhimoeSparseMoeBlock``
(SparseMixer top-2, ``estimator="heun3"``) and ``Qwen2MoeSparseMoeBlock`` (softmax top-k,
renormalised only when ``norm_topk_prob``, plus a shared expert scaled by ``sigmoid(x w)``), all
with experts stored as ``gate_up_proj`` (E, 2h, d) and ``down_proj`` (E, d, h) (transformers >= 5).
:func:`sparseforge.moe.swap.moe_` swaps them inside whole models.

Not carried over: training-time input jitter (Mixtral's ``router_jitter_noise`` and PhiMoE's
``input_jitter_noise`` multiply the experts' input too; ours perturbs the router input only).

Example:
    >>> from transformers import MixtralConfig  # doctest: +SKIP
    >>> from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # doctest: +SKIP
    >>> block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=48))  # doctest: +SKIP
    >>> moe = from_mixtral_block(block)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from sparseforge.errors import ModelError
from sparseforge.moe.layer import MoE

__all__ = ["from_mixtral_block", "from_phimoe_block", "from_qwen2_moe_block", "split_gate_up", "ACTIVATIONS"]

# transformers hidden_act -> our activation name
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def split_gate_up(gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
    """transformers' ``gate_up_proj`` (E, 2h, d) and ``down_proj`` (E, d, h) ->
    our ``w_gate``, ``w_up`` (E, d, h) and ``w_down`` (E, h, d) (contiguous copies)."""
    h = gate_up_proj.shape[1] // 2
    w_gate = gate_up_proj[:, :h, :].transpose(1, 2).contiguous()  # (E, d, h)
    w_up = gate_up_proj[:, h:, :].transpose(1, 2).contiguous()  # (E, d, h)
    w_down = down_proj.transpose(1, 2).contiguous()  # (E, h, d)
    return w_gate, w_up, w_down


def _experts(block: nn.Module):
    experts = getattr(block, "experts", None)
    if experts is None or not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        raise ModelError(
            f"{type(block).__name__} has no stacked experts (experts.gate_up_proj / experts.down_proj); "
            "transformers >= 5 MoE blocks store them that way"
        )
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ModelError(f"expert activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return experts, ACTIVATIONS[act]


def from_mixtral_block(block: nn.Module, **kwargs) -> MoE:
    """Our layer with the weights of a Mixtral-style block (router ``block.gate.weight`` (E, d))."""
    experts, act = _experts(block)
    w_gate, w_up, w_down = split_gate_up(experts.gate_up_proj.detach(), experts.down_proj.detach())
    kwargs.setdefault("k", block.top_k)
    return MoE.from_weights(block.gate.weight.detach(), w_up, w_down, w_gate, activation=act, **kwargs)


def from_phimoe_block(block: nn.Module, estimator: str = "heun3", **kwargs) -> MoE:
    """Our layer with the weights of a PhiMoE block: SparseMixer top-2 with its ``jitter_eps``."""
    experts, act = _experts(block)
    w_gate, w_up, w_down = split_gate_up(experts.gate_up_proj.detach(), experts.down_proj.detach())
    options = {"jitter_eps": float(block.router.router_jitter_noise), "estimator": estimator}
    return MoE.from_weights(
        block.router.weight.detach(), w_up, w_down, w_gate, k=block.top_k, router="sparsemixer",
        router_options=options, activation=act, **kwargs,
    )


def from_qwen2_moe_block(block: nn.Module, **kwargs) -> MoE:
    """Our layer with the weights of a Qwen2-MoE block: softmax top-k (renormalised iff the
    router's ``norm_topk_prob``) plus the shared expert and its sigmoid gate."""
    experts, act = _experts(block)
    shared, shared_gate = getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None)
    if shared is None or shared_gate is None or not all(hasattr(shared, n) for n in ("gate_proj", "up_proj", "down_proj")):
        raise ModelError(f"{type(block).__name__} has no shared_expert (gate/up/down_proj) and shared_expert_gate")
    if any(getattr(shared, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")) or shared_gate.bias is not None:
        raise ModelError("the shared expert has biases; sparseforge's MoE layer has none")
    w_gate, w_up, w_down = split_gate_up(experts.gate_up_proj.detach(), experts.down_proj.detach())
    options = {"renormalize": bool(block.gate.norm_topk_prob)}
    moe = MoE.from_weights(
        block.gate.weight.detach(), w_up, w_down, w_gate, k=block.gate.top_k, router="softmax_topk",
        router_options=options, activation=act, shared_hidden=shared.gate_proj.out_features, shared_gate=True,
        **kwargs,
    )
    with torch.no_grad():
        moe.shared.w_gate.copy_(shared.gate_proj.weight.t())  # (d, hs)
        moe.shared.w_up.copy_(shared.up_proj.weight.t())  # (d, hs)
        moe.shared.w_down.copy_(shared.down_proj.weight.t())  # (hs, d)
        moe.shared_gate.weight.copy_(shared_gate.weight)  # (1, d)
    return moe
