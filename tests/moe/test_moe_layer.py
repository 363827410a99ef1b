"""The MoE layer: end-to-end against the dense oracle, auxiliary losses, capacity, randomness."""

from __future__ import annotations

import pytest
import torch

from moe_reference import dense_moe
from sparseforge.errors import ConfigError
from sparseforge.moe import MoE, load_balancing_loss, router_z_loss
from sparseforge.moe.routers import capacity_for


def _layer(**kw):
    torch.manual_seed(0)
    base = dict(d_model=8, d_hidden=12, num_experts=5, k=2, dtype=torch.float64)
    base.update(kw)
    return MoE(**base)


@pytest.mark.parametrize(
    "router,k,options",
    [("softmax_topk", 2, {}), ("softmax_topk", 3, {"renormalize": False}), ("switch", 1, {}),
     ("sigmoid", 2, {"threshold": 0.0}), ("sparsemixer", 2, {"jitter_eps": 0.5}),
     ("sparsemixer", 1, {"jitter_eps": 0.5, "estimator": "heun3"})],
)
@pytest.mark.parametrize("expert", ["glu", "mlp"])
def test_layer_matches_dense_oracle_including_router_gradient(router, k, options, expert):
    layer = _layer(router=router, k=k, router_options=options, expert=expert).train()
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x, generator=torch.Generator().manual_seed(1))
    (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
    got = [x.grad] + [p.grad for p in layer.parameters()]

    x2 = x.detach().clone().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    flat = x2.reshape(-1, 8)
    experts, weights, _ = layer.router(layer.gate(flat), generator=torch.Generator().manual_seed(1))
    ref = dense_moe(flat, experts, weights, layer.w_up, layer.w_down, layer.w_gate).view_as(y)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    (ref * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
    want = [x2.grad] + [p.grad for p in layer.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    assert layer.gate.weight.grad.abs().sum() > 0  # the router learns through the gates


def test_shared_expert_is_added_and_gated():
    layer = _layer(shared_hidden=6, shared_gate=True)
    x = torch.randn(4, 8, dtype=torch.float64)
    y, _ = layer(x)
    plain = _layer()
    plain.load_state_dict(layer.state_dict(), strict=False)  # same router and experts, no shared
    y0, _ = plain(x)
    s = layer.shared
    shared = (torch.nn.functional.silu(x @ s.w_gate) * (x @ s.w_up)) @ s.w_down
    torch.testing.assert_close(y, y0 + torch.sigmoid(layer.shared_gate(x)) * shared)


def test_aux_losses_follow_their_formulas():
    layer = _layer(k=2, lb_coef=0.5, z_coef=0.25)
    x = torch.randn(40, 8, dtype=torch.float64)
    _, aux = layer(x)
    logits = layer.gate(x)
    probs = torch.softmax(logits, -1)
    top = torch.topk(probs, 2, dim=-1).indices
    f = torch.bincount(top.reshape(-1), minlength=5).double() / top.numel()
    lb = 5 * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(aux.load_balancing_loss, lb)
    torch.testing.assert_close(aux.z_loss, z)
    torch.testing.assert_close(aux.loss, 0.5 * lb + 0.25 * z)
    assert aux.tokens_per_expert.tolist() == torch.bincount(top.reshape(-1), minlength=5).tolist()
    assert aux.dropped_fraction == 0.0


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    E, T = 4, 8
    uniform = torch.full((T, E), 1.0 / E)
    experts = torch.arange(T).remainder(E).unsqueeze(1)  # (T, 1) round robin
    assert float(load_balancing_loss(experts, uniform)) == pytest.approx(1.0)
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 1.0
    assert float(load_balancing_loss(torch.zeros(T, 1, dtype=torch.long), collapsed)) == pytest.approx(E)
    assert float(router_z_loss(torch.zeros(3, E))) == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def test_capacity_drops_overflow_and_reports_it():
    layer = _layer(num_experts=4, k=1, capacity_factor=0.5)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[2, 0] = 10.0  # every token with x[:, 0] > 0 prefers expert 2
    x = torch.randn(32, 8, dtype=torch.float64)
    x[:, 0] = 1.0
    y, aux = layer(x)
    cap = capacity_for(0.5, 32, 1, 4)
    assert cap == 4
    assert aux.tokens_per_expert.tolist() == [0, 0, 4, 0]
    assert aux.dropped_fraction == pytest.approx(28 / 32)
    assert torch.count_nonzero(y[4:].abs().sum(-1)) == 0  # later tokens were dropped: zero output
    assert torch.all(y[:4].abs().sum(-1) > 0)


def test_expert_choice_layer_uses_the_capacity():
    layer = _layer(router="expert_choice", k=2, capacity_factor=1.0)
    x = torch.randn(10, 8, dtype=torch.float64)
    y, aux = layer(x)
    assert aux.tokens_per_expert.tolist() == [capacity_for(1.0, 10, 2, 5)] * 5
    experts, weights, _ = layer.router(layer.gate(x), capacity=4)
    torch.testing.assert_close(y, dense_moe(x, experts, weights, layer.w_up, layer.w_down, layer.w_gate))


def test_seeded_noise_is_reproducible_and_eval_is_deterministic():
    x = torch.randn(64, 8, dtype=torch.float64)
    a = _layer(router="sparsemixer", input_jitter=0.1, seed=3)
    b = _layer(router="sparsemixer", input_jitter=0.1, seed=3)
    ya, _ = a(x)
    yb, _ = b(x)
    assert torch.equal(ya, yb)
    ya2, _ = a(x)  # the layer's generator advanced: different noise
    assert not torch.equal(ya, ya2)
    yg1, _ = a(x, generator=torch.Generator().manual_seed(1))
    yg2, _ = b(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(yg1, yg2)
    a.eval()
    torch.manual_seed(5)
    e1, _ = a(x)
    torch.manual_seed(6)
    e2, _ = a(x)
    assert torch.equal(e1, e2)


def test_input_shapes_and_dtypes():
    layer = _layer()
    for shape in [(8,), (3, 8), (2, 3, 8)]:
        y, _ = layer(torch.randn(*shape, dtype=torch.float64))
        assert y.shape == shape
    bf = MoE(8, 12, 4, 2, dtype=torch.bfloat16)
    y, _ = bf(torch.randn(5, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("router,k", [("softmax_topk", 2), ("sparsemixer", 2), ("sigmoid", 2), ("expert_choice", 2), ("switch", 1)])
def test_empty_batch(router, k):
    layer = _layer(router=router, k=k, capacity_factor=1.0 if router == "expert_choice" else None)
    x = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (0, 8) and aux.tokens_per_expert.sum() == 0
    assert aux.loss.item() == 0.0
    (y.sum() + aux.loss).backward()


def test_a_config_object_and_the_keyword_arguments_build_the_same_layer():
    from sparseforge.moe import MoEConfig

    cfg = MoEConfig(8, 16, 4, k=2, expert="mlp", activation="gelu", shared_hidden=12, shared_gate=True, capacity_factor=1.5)
    torch.manual_seed(0)
    a = MoE(cfg)
    torch.manual_seed(0)
    b = MoE(8, 16, 4, 2, expert="mlp", activation="gelu", shared_hidden=12, shared_gate=True, capacity_factor=1.5)
    torch.manual_seed(0)
    c = MoE(config=cfg, dtype=torch.float64)
    assert a.config == b.config == cfg and a.capacity_factor == 1.5 and a.w_gate is None
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[n], b.state_dict()[n]) for n in a.state_dict())
    assert c.w_up.dtype == torch.float64
    with pytest.raises(ConfigError, match="not both"):
        MoE(cfg, backend="loop")
    with pytest.raises(ConfigError, match="shared_gate=True needs a shared expert"):
        MoEConfig(8, 16, 4, shared_gate=True)
