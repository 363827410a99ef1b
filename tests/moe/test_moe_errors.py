"""Bad configurations raise ConfigError with a message that says what to change."""

from __future__ import annotations

import pytest
import torch

from sparseforge.errors import ConfigError
from sparseforge.moe import MoE
from sparseforge.moe.routers import make_router


@pytest.mark.parametrize("router", ["softmax_topk", "expert_choice", "sigmoid", "sparsemixer"])
def test_k_larger_than_num_experts(router):
    with pytest.raises(ConfigError, match=r"k=5 experts per token but only 4 experts"):
        MoE(8, 16, num_experts=4, k=5, router=router, capacity_factor=1.0)


@pytest.mark.parametrize("bad", [0, -1.0, 0.0, float("inf"), float("nan"), "1.0", True])
def test_capacity_factor_must_be_positive(bad):
    with pytest.raises(ConfigError, match="capacity_factor must be a finite number > 0"):
        MoE(8, 16, 4, 2, capacity_factor=bad)


def test_expert_choice_needs_a_capacity():
    with pytest.raises(ConfigError, match="expert_choice routing needs a capacity|expert-choice routing needs a capacity"):
        MoE(8, 16, 4, 2, router="expert_choice")


def test_mismatched_expert_shapes():
    E, d, h = 4, 8, 16
    router = torch.randn(E, d)
    up, down, gate = torch.randn(E, d, h), torch.randn(E, h, d), torch.randn(E, d, h)
    MoE.from_weights(router, up, down, gate)  # fits
    with pytest.raises(ConfigError, match=r"mismatched expert shapes: w_down is \(4, 8, 16\)"):
        MoE.from_weights(router, up, down.transpose(1, 2), gate)
    with pytest.raises(ConfigError, match="mismatched expert shapes: w_up"):
        MoE.from_weights(torch.randn(E + 1, d), up, down, gate)
    with pytest.raises(ConfigError, match="mismatched expert shapes: w_gate"):
        MoE.from_weights(router, up, down, gate[:, :, :-1])
    with pytest.raises(ConfigError, match="must be router"):
        MoE.from_weights(router, up[0], down, gate)


@pytest.mark.parametrize("name", ["topk", "Switch", "", None])
def test_unknown_router_name(name):
    with pytest.raises(ConfigError, match=r"unknown router .* choose one of \['expert_choice', 'sigmoid'"):
        MoE(8, 16, 4, 2, router=name)
    with pytest.raises(ConfigError, match="unknown router"):
        make_router(name, 4, 2)


def test_other_bad_options():
    with pytest.raises(ConfigError, match="bad options for router 'softmax_topk'"):
        MoE(8, 16, 4, 2, router_options={"renormalise": True})
    with pytest.raises(ConfigError, match="switch routing is top-1"):
        MoE(8, 16, 4, 2, router="switch")
    with pytest.raises(ConfigError, match="unknown activation"):
        MoE(8, 16, 4, 2, activation="swish")
    with pytest.raises(ConfigError, match="expert must be 'glu' or 'mlp'"):
        MoE(8, 16, 4, 2, expert="moe")
    with pytest.raises(ConfigError, match="num_experts must be a positive integer"):
        MoE(8, 16, 0, 1)
    with pytest.raises(ConfigError, match="shared_gate=True needs a shared expert"):
        MoE(8, 16, 4, 2, shared_gate=True)
    with pytest.raises(ConfigError, match=r"MoE expects inputs \(\.\.\., 8\)"):
        MoE(8, 16, 4, 2)(torch.randn(3, 7))
    with pytest.raises(ConfigError, match="unknown dispatch backend 'fast'"):
        MoE(8, 16, 4, 2, backend="fast")
    with pytest.raises(ConfigError, match="router logits must be"):
        make_router("softmax_topk", 4, 2)(torch.randn(3, 5))
