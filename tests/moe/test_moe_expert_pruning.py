"""Expert pruning by routing statistics: selection, pruned layers, one expert = a plain MLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError, DataError
from sparseforge.moe import MoE
from sparseforge.moe.expert_pruning import (
    DenseMLP, ProgressiveExpertPruner, RoutingStats, collect_routing_stats, prune_experts, prune_experts_, to_dense,
)
from sparseforge.moe.losses import MoEAux
from sparseforge.moe.swap import MoEBlock, collect_aux

from moe_reference import dense_moe


def _stats(hits, alpha):
    s = RoutingStats(len(hits))
    s.hits = torch.tensor(hits, dtype=torch.float64)
    s.alpha = torch.tensor(alpha, dtype=torch.float64)
    s.tokens = 10
    return s


def test_proficiency_formula_and_selection_on_hand_built_stats():
    # hits: expert 2 busiest; alpha: expert 0 has the highest mean probability
    s = _stats([10, 0, 30, 20, 40], [0.4, 0.1, 0.2, 0.2, 0.1])
    alpha = torch.tensor([0.4, 0.1, 0.2, 0.2, 0.1]).double()
    hit = torch.tensor([10, 0, 30, 20, 40]).double() / 100
    ref = alpha * hit / (alpha * hit).sum()  # 0.04, 0, 0.06, 0.04, 0.04 -> normalised
    torch.testing.assert_close(s.proficiency(), ref)
    assert s.select(1) == [2]
    assert s.select(2) == [0, 2]  # 0, 3, 4 tie at 0.04: the lower index wins
    assert s.select(4) == [0, 2, 3, 4]  # the unused expert 1 goes first
    assert s.select(5) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError):
        s.select(0)
    with pytest.raises(DataError):
        RoutingStats(3).proficiency()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=2, max_size=9), st.data())
def test_selection_keeps_the_most_proficient(hits, data):
    E = len(hits)
    alpha = data.draw(st.lists(st.floats(0.01, 1.0), min_size=E, max_size=E))
    if sum(hits) == 0:
        hits[0] = 1
    s = _stats(hits, alpha)
    n = data.draw(st.integers(1, E))
    keep = s.select(n)
    prof = s.proficiency()
    dropped = [e for e in range(E) if e not in keep]
    assert len(keep) == n and keep == sorted(keep)
    if dropped:
        assert min(prof[keep]) >= max(prof[dropped])


def test_stats_from_aux():
    experts = torch.tensor([[0, 2], [2, -1], [1, 2]])
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [0.2, 0.4, 0.4]])
    s = RoutingStats(3)
    s.add(MoEAux(torch.zeros(3, 3), probs, experts, None, 0.0, 0.0, 0.0))
    assert s.hits.tolist() == [1, 1, 3] and s.tokens == 3
    torch.testing.assert_close(s.alpha, probs.sum(0).double())


@pytest.mark.parametrize("router", ["softmax_topk", "sparsemixer", "sigmoid"])
def test_pruned_layer_equals_the_restricted_mixture(router):
    torch.manual_seed(0)
    opts = {"threshold": 0.0} if router == "sigmoid" else None
    moe = MoE(8, 12, 6, k=2, router=router, router_options=opts).eval()
    keep = [1, 4, 5]
    small = prune_experts(moe, keep)
    assert small.num_experts == 3 and small.k == 2 and small.router.num_experts == 3
    x = torch.randn(20, 8)
    with torch.no_grad():
        y, aux = small(x)
        # reference: the same router on the kept logits, the kept experts
        logits = x @ moe.gate.weight[keep].t()
        experts, weights, _ = small.router(logits)
        ref = dense_moe(x, experts, weights, moe.w_up[keep], moe.w_down[keep], moe.w_gate[keep])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert moe.num_experts == 6  # the original is untouched


@pytest.mark.parametrize("shared", [None, "plain", "gated"])
@pytest.mark.parametrize("expert", ["glu", "mlp"])
def test_one_expert_is_a_plain_mlp(shared, expert):
    torch.manual_seed(1)
    moe = MoE(8, 12, 5, k=2, expert=expert, activation="gelu", shared_hidden=None if shared is None else 6,
              shared_gate=shared == "gated")
    one = prune_experts(moe, [3])
    dense = to_dense(one)
    assert isinstance(dense, DenseMLP)
    x = torch.randn(2, 7, 8)
    # the MLP with expert 3's weights, written out
    hid = F.gelu(x @ moe.w_up[3]) if expert == "mlp" else F.gelu(x @ moe.w_gate[3]) * (x @ moe.w_up[3])
    ref = hid @ moe.w_down[3]
    if shared is not None:
        s = moe.shared
        sh = (F.gelu(x @ s.w_up) if expert == "mlp" else F.gelu(x @ s.w_gate) * (x @ s.w_up)) @ s.w_down
        ref = ref + (torch.sigmoid(x @ moe.shared_gate.weight.t()) * sh if shared == "gated" else sh)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one(x)[0], ref, rtol=1e-5, atol=1e-5)  # the 1-expert MoE, train mode


def test_to_dense_refuses_what_is_not_an_mlp():
    with pytest.raises(ConfigError, match="one expert"):
        to_dense(MoE(4, 8, 2, k=1))
    with pytest.raises(ConfigError, match="not a plain MLP"):
        to_dense(prune_experts(MoE(4, 8, 3, k=1, router="sigmoid", router_options={"threshold": 0.0}), [0]))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = MoEBlock(MoE(8, 12, 6, k=2))
        self.b = MoEBlock(MoE(8, 12, 6, k=2, shared_hidden=4))

    def forward(self, x):
        return self.b(x + self.a(x))


def test_prune_experts_in_a_model_down_to_dense():
    torch.manual_seed(2)
    net = _Net().eval()
    batches = [torch.randn(16, 8) for _ in range(3)]
    stats = collect_routing_stats(net, batches)
    assert set(stats) == {"a.moe", "b.moe"} and stats["a.moe"].tokens == 48
    kept = prune_experts_(net, stats, 3)
    assert net.a.moe.num_experts == 3 and kept["a.moe"] == stats["a.moe"].select(3)
    stats = collect_routing_stats(net, batches)
    keep_a, keep_b = stats["a.moe"].select(1)[0], stats["b.moe"].select(1)[0]
    ref_a, ref_b = to_dense(prune_experts(net.a.moe, [keep_a])), to_dense(prune_experts(net.b.moe, [keep_b]))
    prune_experts_(net, stats, 1)
    assert isinstance(net.a, DenseMLP) and isinstance(net.b, DenseMLP)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref_b(x + ref_a(x)))


def test_progressive_pruner_reaches_the_target():
    torch.manual_seed(3)
    net = _Net()
    with torch.no_grad():  # layer a: experts 0 and 1 dominate the routing
        net.a.moe.gate.weight[2:] -= 5.0
    pruner = ProgressiveExpertPruner(net, target=1, num_windows=3, beta=0.5)
    opt_steps = 0
    for window in range(3):
        for _ in range(4):
            with collect_aux(net) as auxes:
                net(torch.randn(32, 8).abs())
            pruner.observe(auxes)
            opt_steps += 1
        kept = pruner.end_window()
        if window == 0:
            assert set(kept["a.moe"]) <= {0, 1}  # the starved experts go in the first window
    assert isinstance(net.a, DenseMLP) and isinstance(net.b, DenseMLP)
    sizes = [[len(h[n]) for h in pruner.history] for n in ("a.moe", "b.moe")]
    assert all(s == sorted(s, reverse=True) and s[-1] == 1 for s in sizes)
    with pytest.raises(ConfigError, match="windows are over"):
        pruner.end_window()
