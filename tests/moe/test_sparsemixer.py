"""SparseMixer: bit-exact against transformers' PhiMoE ``sparsemixer`` (heun3) and against the
paper's mid-point formula written out per token (midpoint)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from sparseforge.errors import ConfigError
from sparseforge.moe.sparsemixer import SparseMixer, SparseMixerNoise, sparsemixer_route

phimoe = importlib.import_module("transformers.models.phimoe.modeling_phimoe")


def _close_logits(T, E, seed):
    """Logits whose top entries are close, so the jitter mask keeps several experts."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=gen) * 0.02 + torch.randn(T, 1, generator=gen)


def _phimoe_noise(T, E, seed):
    """The random numbers PhiMoE's sparsemixer draws after ``torch.manual_seed(seed)``, in its
    order (its second coin is ``rand_like(...).uniform_()``: two draws, the second one used)."""
    torch.manual_seed(seed)
    e1 = torch.empty(T, E).exponential_()
    u1 = torch.rand(T, 1)
    e2 = torch.empty(T, E).exponential_()
    u2 = torch.rand(T, 1).uniform_()
    return SparseMixerNoise((e1, e2), (u1, u2))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("jitter_eps", [0.01, 0.1])
def test_heun3_matches_phimoe_forward_and_gradient_bit_exact(seed, jitter_eps):
    T, E = 96, 8
    logits = _close_logits(T, E, seed)
    upstream = torch.randn(T, 2, generator=torch.Generator().manual_seed(99))
    noise = _phimoe_noise(T, E, seed)

    ref_logits = logits.clone().requires_grad_()
    torch.manual_seed(seed)
    ref_w, ref_e = phimoe.sparsemixer(ref_logits, jitter_eps=jitter_eps, training=True)
    (ref_w * upstream).sum().backward()

    our_logits = logits.clone().requires_grad_()
    experts, weights = sparsemixer_route(
        our_logits, 2, jitter_eps=jitter_eps, training=True, estimator="heun3", noise=noise
    )
    (weights * upstream).sum().backward()

    assert torch.equal(experts, ref_e)
    assert torch.equal(weights, ref_w)
    assert torch.equal(our_logits.grad, ref_logits.grad)
    # the test exercises both branches of the coin and a sampled non-argmax expert
    assert (weights < 0.5 * weights.detach().max()).any()
    assert (experts[:, 0] != logits.argmax(-1)).any()


def test_eval_matches_phimoe_and_is_deterministic():
    logits = _close_logits(50, 6, 3)
    ref_logits = logits.clone().requires_grad_()
    ref_w, ref_e = phimoe.sparsemixer(ref_logits, jitter_eps=0.01, training=False)
    ref_w.sum().backward()
    router = SparseMixer(6, 2, jitter_eps=0.01, estimator="heun3").eval()
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    ours = logits.clone().requires_grad_()
    r = router(ours, generator=gen)
    r.weights.sum().backward()
    assert torch.equal(r.experts, ref_e) and torch.equal(r.weights, ref_w)
    assert torch.equal(ours.grad, ref_logits.grad)
    assert torch.equal(gen.get_state(), state)  # eval draws no noise
    for estimator in ("midpoint", "heun3"):  # eval does not depend on the estimator
        again = SparseMixer(6, 2, jitter_eps=0.01, estimator=estimator).eval()(logits)
        assert torch.equal(again.experts, r.experts) and torch.equal(again.weights, r.weights.detach())


def _paper_reference(z, u_exp, u_coin, k, eps):
    """The 2023 paper's estimator (code v1, extended to top-2 as GRIN does), per token in float64:
    weight = pi_D * (1 if D is the argmax or coin > 0.5 else 1/2); d weight-sum / dz = 2 g pi_D (e_D - pi)."""
    T, E = z.shape
    experts = torch.zeros(T, k, dtype=torch.long)
    weights = torch.zeros(T, k, dtype=torch.float64)
    dz = torch.zeros(T, k, E, dtype=torch.float64)  # d weight[t, j] / d z[t, :] as the estimator defines it
    for t in range(T):
        taken: list[int] = []
        for j in range(k):
            avail = [i for i in range(E) if i not in taken]
            top = max(float(z[t, i]) for i in avail)
            keep = [i for i in avail if (top - float(z[t, i])) / max(abs(float(z[t, i])), top) <= 2 * eps]
            mx = max(float(z[t, i]) for i in keep)
            denom = sum(math.exp(float(z[t, i]) - mx) for i in keep)
            pi = {i: math.exp(float(z[t, i]) - mx) / denom for i in keep}
            d = max(keep, key=lambda i: float(z[t, i]) - math.log(float(u_exp[j][t, i])))
            argmax = max(keep, key=lambda i: (pi[i], -i))
            scale = 1.0 if (d == argmax or float(u_coin[j][t, 0]) > 0.5) else 0.5
            experts[t, j], weights[t, j] = d, pi[d] * scale
            for i in keep:
                dz[t, j, i] = 2.0 * pi[d] * ((1.0 if i == d else 0.0) - pi[i])
            taken.append(d)
    return experts, weights, dz


@pytest.mark.parametrize("k", [1, 2])
def test_midpoint_follows_the_paper_formula(k):
    T, E, eps = 40, 5, 0.05
    z = _close_logits(T, E, 7).double()
    gen = torch.Generator().manual_seed(11)
    noise = SparseMixerNoise.draw(T, E, k, dtype=torch.float64, generator=gen)
    ref_e, ref_w, ref_dz = _paper_reference(z, noise.exponential, noise.uniform, k, eps)
    g = torch.randn(T, k, dtype=torch.float64, generator=gen)
    zz = z.clone().requires_grad_()
    experts, weights = sparsemixer_route(zz, k, jitter_eps=eps, training=True, estimator="midpoint", noise=noise)
    (weights * g).sum().backward()
    assert torch.equal(experts, ref_e)
    torch.testing.assert_close(weights.detach(), ref_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(zz.grad, torch.einsum("tj,tje->te", g, ref_dz), rtol=1e-12, atol=1e-14)
    assert (ref_w < 0.75 * ref_w.max()).any()  # some mid-point (halved) gates were exercised


def test_midpoint_and_heun3_differ_as_documented():
    """Same noise and choices; midpoint's gradient is exactly twice heun3's wherever both take the
    first-order branch (coin above 0.75 or D = argmax)."""
    T, E = 64, 8
    logits = _close_logits(T, E, 5)
    noise = SparseMixerNoise.draw(T, E, 1, generator=torch.Generator().manual_seed(5))
    grads, outs = {}, {}
    for est in ("midpoint", "heun3"):
        z = logits.clone().requires_grad_()
        e, w = sparsemixer_route(z, 1, jitter_eps=0.05, training=True, estimator=est, noise=noise)
        w.sum().backward()
        grads[est], outs[est] = z.grad, (e, w.detach())
    assert torch.equal(outs["midpoint"][0], outs["heun3"][0])
    first = outs["heun3"][1] == outs["midpoint"][1]  # (T, 1) both unscaled
    assert first.any() and (~first).any()
    rows = first.squeeze(1)
    assert torch.equal(grads["midpoint"][rows], 2 * grads["heun3"][rows])


def test_gumbel_sampling_follows_the_masked_softmax():
    T, E = 20000, 4
    z = torch.tensor([[0.3, 0.0, -0.2, 0.1]]).expand(T, E)
    noise = SparseMixerNoise.draw(T, E, 1, generator=torch.Generator().manual_seed(0))
    experts, _ = sparsemixer_route(z, 1, jitter_eps=10.0, training=True, noise=noise)  # nothing masked
    freq = torch.bincount(experts[:, 0], minlength=E).double() / T
    pi = torch.softmax(z[0].double(), 0)
    assert torch.all((freq - pi).abs() < 4 * torch.sqrt(pi * (1 - pi) / T))


def test_router_noise_comes_from_the_generator():
    router = SparseMixer(8, 2).train()
    logits = _close_logits(30, 8, 1)
    r1 = router(logits, generator=torch.Generator().manual_seed(4))
    r2 = router(logits, generator=torch.Generator().manual_seed(4))
    assert torch.equal(r1.experts, r2.experts) and torch.equal(r1.weights, r2.weights)
    noise = SparseMixerNoise.draw(30, 8, 2, generator=torch.Generator().manual_seed(4))
    e, w = sparsemixer_route(logits, 2, training=True, noise=noise)
    assert torch.equal(e, r1.experts) and torch.equal(w, r1.weights)
    assert torch.equal(r1.probs, torch.softmax(logits, -1))


@pytest.mark.parametrize("k", [3, 4])
def test_k_above_two_is_a_config_error(k):
    with pytest.raises(ConfigError, match="top-1 .* top-2"):
        SparseMixer(8, k)
    with pytest.raises(ConfigError, match="k > 2"):
        sparsemixer_route(torch.zeros(2, 8), k, training=False)


def test_training_without_noise_and_unknown_estimator_are_errors():
    with pytest.raises(ConfigError, match="noise"):
        sparsemixer_route(torch.zeros(2, 4), 1, training=True)
    with pytest.raises(ConfigError, match="estimator"):
        SparseMixer(4, 1, estimator="euler")
