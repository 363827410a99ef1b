"""Equivalence with transformers' Mixtral and PhiMoE MoE blocks (tiny random configs)."""

from __future__ import annotations

import pytest
import torch

import transformers
from transformers import MixtralConfig, PhimoeConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock  # noqa: E402

from sparseforge.moe.hf import from_mixtral_block, from_phimoe_block  # noqa: E402


def _init(block, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return block


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("experts,k", [(4, 2), (8, 3)])
def test_mixtral_block_outputs_and_gradients_equal(impl, experts, k):
    config = MixtralConfig(
        hidden_size=32, intermediate_size=48, num_local_experts=experts, num_experts_per_tok=k,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = impl
    block = _init(MixtralSparseMoeBlock(config), 0)
    ours = from_mixtral_block(block)
    x = torch.randn(2, 13, 32)
    x_ref = x.clone().requires_grad_()
    y_ref = block(x_ref)
    x_our = x.clone().requires_grad_()
    y, _ = ours(x_our)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x_our.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.gate.weight.grad, block.gate.weight.grad, rtol=1e-4, atol=1e-5)
    h = config.intermediate_size
    gate_up_grad = block.experts.gate_up_proj.grad  # (E, 2h, d)
    torch.testing.assert_close(ours.w_gate.grad, gate_up_grad[:, :h].transpose(1, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.w_up.grad, gate_up_grad[:, h:].transpose(1, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.w_down.grad, block.experts.down_proj.grad.transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_mixtral_eval_decode_single_token():
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    block = _init(MixtralSparseMoeBlock(config), 1).eval()
    ours = from_mixtral_block(block).eval()
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], block(x), rtol=1e-5, atol=1e-5)


def test_phimoe_block_eval_equal():
    config = PhimoeConfig(
        hidden_size=32, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2, router_jitter_noise=0.5,
    )
    config._experts_implementation = "eager"
    block = _init(PhimoeSparseMoeBlock(config), 2).eval()
    ours = from_phimoe_block(block).eval()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], block(x), rtol=1e-5, atol=1e-5)
