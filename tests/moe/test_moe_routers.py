"""Routers against their formulas; the shared (T, k) / -1 slot convention."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.moe.routers import ExpertChoice, SigmoidRouter, SoftmaxTopK, SwitchTop1, make_router


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_formula_and_gradient(renormalize):
    z = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    r = SoftmaxTopK(6, 3, renormalize=renormalize)(z)
    p = torch.softmax(z, -1)
    vals, idx = torch.topk(p, 3, dim=-1)
    want = vals / vals.sum(-1, keepdim=True) if renormalize else vals
    assert torch.equal(r.experts, idx)
    torch.testing.assert_close(r.weights, want)
    g = torch.randn(9, 3, dtype=torch.float64)
    (gz,) = torch.autograd.grad((r.weights * g).sum(), z)
    (gz_ref,) = torch.autograd.grad((want * g).sum(), z)
    torch.testing.assert_close(gz, gz_ref)


def test_ties_keep_the_lower_expert_index():
    r = SoftmaxTopK(5, 2)(torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]]))
    assert r.experts.tolist() == [[1, 2]]


@pytest.mark.parametrize("hard", [False, True])
def test_switch_gate_value_and_straight_through_gradient(hard):
    z = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    r = SwitchTop1(4, hard=hard)(z)
    p = torch.softmax(z, -1)
    assert torch.equal(r.experts[:, 0], p.argmax(-1))
    p_d = p.gather(-1, r.experts)
    if hard:
        assert torch.equal(r.weights, torch.ones_like(p_d))
    else:
        torch.testing.assert_close(r.weights, p_d)
    (g,) = torch.autograd.grad(r.weights.sum(), z)
    (g_ref,) = torch.autograd.grad(p_d.sum(), z)
    torch.testing.assert_close(g, g_ref)  # both learn through d p_D


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 25), E=st.integers(1, 6), cap=st.integers(1, 30), seed=st.integers(0, 999))
def test_property_expert_choice_each_expert_takes_its_best_tokens(T, E, cap, seed):
    z = torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = ExpertChoice(E, 1)(z, capacity=cap)
    p = torch.softmax(z, -1)
    c = min(cap, T)
    for e in range(E):
        tokens = (r.experts == e).nonzero()[:, 0]
        assert tokens.numel() == c  # exactly the capacity
        best = torch.sort(p[:, e], descending=True, stable=True).indices[:c]
        assert sorted(tokens.tolist()) == sorted(best.tolist())
        slot = (r.experts == e).nonzero()
        torch.testing.assert_close(r.weights[slot[:, 0], slot[:, 1]], p[tokens, e])
    assert torch.all(r.weights[r.experts < 0] == 0)
    assert r.experts.shape[1] == max(1, int(torch.bincount((r.experts >= 0).sum(1)).nonzero().max()))


def test_sigmoid_threshold_routing_variable_experts_per_token():
    z = torch.tensor([[2.0, -1.0, 0.5, -3.0], [-2.0, -2.0, -2.0, -2.0], [3.0, 2.0, 1.0, 0.1]])
    r = SigmoidRouter(4, k=None, threshold=0.6)(z)
    s = torch.sigmoid(z)
    assert r.experts.tolist() == [[0, 2, -1], [-1, -1, -1], [0, 1, 2]]
    assert torch.equal(r.weights[0, :2], s[0, [0, 2]]) and torch.all(r.weights[1] == 0)
    capped = SigmoidRouter(4, k=2, threshold=0.0, renormalize=True)(z)
    assert capped.experts.tolist() == [[0, 2], [0, 1], [0, 1]]
    torch.testing.assert_close(capped.weights.sum(-1), torch.ones(3))
    torch.testing.assert_close(r.probs, s / s.sum(-1, keepdim=True))


def test_make_router_builds_every_registered_router():
    for name in ["softmax_topk", "switch", "expert_choice", "sigmoid", "sparsemixer"]:
        k = 1 if name == "switch" else 2
        router = make_router(name, 4, k)
        assert router.num_experts == 4 and router.k == k
