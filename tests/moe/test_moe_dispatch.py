"""Sort-based dispatch and the grouped FFN against the dense oracle (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_reference import dense_moe
from sparseforge.errors import ConfigError
from sparseforge.moe.dispatch import apply_capacity, build_plan, combine_slots
from sparseforge.moe import grouped
from sparseforge.moe.grouped import ONEDNN_MIN_ROWS, GroupedFFN, few_tokens_ffn, grouped_ffn, resolve_backend

ONEDNN = "onednn"  # the opt-in private-op backend: the locked torch has it (test_onednn_signature_is_pinned)


def _routing(T, E, k, gen, empty=0.0):
    """Random distinct experts per token; a share ``empty`` of slots set to -1."""
    experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])  # (T, k)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64)
    if empty:
        hole = torch.rand(T, k, generator=gen) < empty
        experts = experts.masked_fill(hole, -1)
        weights = weights.masked_fill(hole, 0.0)
    return experts, weights


def _weights(E, d, h, glu, gen):
    w_up = torch.randn(E, d, h, generator=gen, dtype=torch.float64) / d**0.5
    w_down = torch.randn(E, h, d, generator=gen, dtype=torch.float64) / h**0.5
    w_gate = torch.randn(E, d, h, generator=gen, dtype=torch.float64) / d**0.5 if glu else None
    return w_up, w_down, w_gate


def test_build_plan_groups_by_expert_and_skips_empty_slots():
    experts = torch.tensor([[2, 0], [1, 2], [-1, 2], [0, -1]])  # (T=4, k=2)
    plan = build_plan(experts, num_experts=4)
    assert plan.counts == [2, 1, 3, 0]
    flat = experts.reshape(-1)
    assert flat[plan.slot].tolist() == [0, 0, 1, 2, 2, 2]  # grouped, expert order
    assert plan.token.tolist() == [0, 3, 1, 0, 1, 2]  # stable: token order within an expert
    assert torch.equal(plan.token, plan.slot // 2)
    assert plan.position.tolist() == [3, 0, 2, 4, 6, 5, 1, 6]  # sorted position per slot; empty -> S = 6
    assert torch.equal(plan.position[plan.slot], torch.arange(6))


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 9), k=st.integers(1, 3), E=st.integers(1, 5), d=st.integers(1, 4), seed=st.integers(0, 999),
       empty=st.floats(0.0, 0.6))
def test_combine_slots_equals_a_per_token_loop(T, k, E, d, seed, empty):
    gen = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, E, (T, k), generator=gen)
    experts[torch.rand(T, k, generator=gen) < empty] = -1
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).masked_fill(experts < 0, 0.0)
    plan = build_plan(experts, E)
    S = plan.token.numel()
    rows = torch.cat([torch.randn(S, d, generator=gen, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64)])
    want = torch.zeros(T, d, dtype=torch.float64)
    for i in range(S):  # each sorted row back to its token, weighted by its slot's gate
        want[plan.token[i]] += weights.reshape(-1)[plan.slot[i]] * rows[i]
    got = combine_slots(rows, plan.position.view(T, k), weights)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    unweighted = combine_slots(rows, plan.position.view(T, k))
    want_sum = torch.zeros(T, d, dtype=torch.float64).index_add_(0, plan.token, rows[:S])
    torch.testing.assert_close(unweighted, want_sum, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), k=st.integers(1, 4), d=st.integers(1, 9), chunk_tokens=st.integers(1, 45),
       weighted=st.booleans(), seed=st.integers(0, 999))
def test_combine_slots_gives_the_same_bits_for_any_chunk_size(T, k, d, chunk_tokens, weighted, seed):
    gen = torch.Generator().manual_seed(seed)
    experts = torch.randint(-1, 4, (T, k), generator=gen)
    plan = build_plan(experts, 4)
    S = plan.token.numel()
    rows = torch.cat([torch.randn(S, d, generator=gen), torch.zeros(1, d)])  # float32: the order shows in the bits
    weights = torch.rand(T, k, generator=gen) if weighted else None
    position = plan.position.view(T, k)
    whole = combine_slots(rows, position, weights, chunk_bytes=1 << 40)
    chunked = combine_slots(rows, position, weights, chunk_bytes=chunk_tokens * k * d * 4)
    assert torch.equal(chunked, whole)
    want = torch.zeros(T, d, dtype=torch.float64)
    w = torch.ones(T * k, dtype=torch.float64) if weights is None else weights.double().reshape(-1)
    for i in range(S):
        want[plan.token[i]] += w[plan.slot[i]] * rows[i].double()
    torch.testing.assert_close(chunked.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["loop", ONEDNN])
@pytest.mark.parametrize("glu,activation", [(True, "silu"), (False, "gelu"), (False, "relu"), (True, "gelu_tanh")])
def test_grouped_ffn_matches_dense_oracle_outputs_and_gradients(glu, activation, backend):
    gen = torch.Generator().manual_seed(1)
    T, E, k, d, h = 23, 6, 2, 8, 12
    experts, weights = _routing(T, E, k, gen, empty=0.15)
    experts[experts == 4] = 5  # expert 4 gets no token: its gradient must be exactly zero
    x = torch.randn(T, d, generator=gen, dtype=torch.float64)
    params = _weights(E, d, h, glu, gen)
    dtype = torch.float64 if backend == "loop" else torch.float32  # the others take float32 only
    x, weights = x.to(dtype), weights.to(dtype)
    params = [None if p is None else p.to(dtype) for p in params]
    tol = 1e-10 if dtype == torch.float64 else 1e-5

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, weights, *[p for p in params if p is not None])]
        xx, ww, up, down, *gate = leaves
        gate = gate[0] if gate else None
        if fn is dense_moe:
            out = dense_moe(xx, experts, ww, up, down, gate, activation)
        else:
            out = grouped_ffn(xx, ww, build_plan(experts, E), up, down, gate, activation, backend=backend)
        out.backward(torch.cos(torch.arange(T * d, dtype=dtype)).view(T, d))
        return out.detach(), [leaf.grad for leaf in leaves]

    out_ref, grads_ref = run(dense_moe)
    out, grads = run(grouped_ffn)
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol)
    assert torch.count_nonzero(grads[3][4]) == 0  # w_down of the unused expert


def test_backends_agree_and_bad_backend_is_an_error():
    gen = torch.Generator().manual_seed(5)
    experts, weights = _routing(30, 8, 2, gen, empty=0.1)
    x = torch.randn(30, 16, generator=gen)
    up, down, gate = (p.float() for p in _weights(8, 16, 20, True, gen))
    plan = build_plan(experts, 8)
    loop = grouped_ffn(x, weights.float(), plan, up, down, gate, backend="loop")
    assert min(plan.counts) < ONEDNN_MIN_ROWS <= max(plan.counts)  # both matmul paths of onednn run
    onednn = grouped_ffn(x, weights.float(), plan, up, down, gate, backend="onednn")
    torch.testing.assert_close(loop, onednn, rtol=1e-5, atol=1e-6)
    assert resolve_backend("auto", x, up) == "loop"  # public torch API unless the private op is asked for
    assert resolve_backend("auto", x.double(), up.double()) == "loop"
    with pytest.raises(ConfigError, match="float32 CPU tensors only"):
        resolve_backend("onednn", torch.zeros(3, 8, dtype=torch.float64))
    with pytest.raises(ConfigError, match="backend='onednn'"):
        grouped_ffn(x.double(), weights, plan, up.double(), down.double(), gate.double(), backend="onednn")
    with pytest.raises(ConfigError, match="unknown dispatch backend"):
        grouped_ffn(x, weights.float(), plan, up, down, gate, backend="fast")


def test_inference_path_equals_autograd_path():
    gen = torch.Generator().manual_seed(2)
    experts, weights = _routing(17, 5, 3, gen, empty=0.1)
    x = torch.randn(17, 8, generator=gen, dtype=torch.float64)
    up, down, gate = _weights(5, 8, 4, True, gen)
    plan = build_plan(experts, 5)
    with torch.no_grad():
        fast = grouped_ffn(x, weights, plan, up, down, gate)
    slow = grouped_ffn(x.requires_grad_(), weights, plan, up, down, gate)
    assert slow.grad_fn is not None
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-12)


def test_gradcheck_grouped_ffn():
    gen = torch.Generator().manual_seed(3)
    experts, weights = _routing(5, 3, 2, gen, empty=0.2)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    up, down, gate = (p.requires_grad_() for p in _weights(3, 3, 4, True, gen))
    weights.requires_grad_()
    plan = build_plan(experts, 3)
    position = plan.position.view(weights.shape)

    def f(x, w, up, down, gate):
        return GroupedFFN.apply(x, w, up, down, gate, plan.token, plan.slot, position, plan.counts, "silu", "loop")

    assert torch.autograd.gradcheck(f, (x, weights, up, down, gate))


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 20), E=st.integers(1, 7), k=st.integers(1, 3), glu=st.booleans(),
    seed=st.integers(0, 2**16), empty=st.sampled_from([0.0, 0.3]),
)
def test_property_grouped_equals_dense(T, E, k, glu, seed, empty):
    k = min(k, E)
    gen = torch.Generator().manual_seed(seed)
    experts, weights = _routing(T, E, k, gen, empty=empty)
    x = torch.randn(T, 4, generator=gen, dtype=torch.float64)
    up, down, gate = _weights(E, 4, 3, glu, gen)
    out = grouped_ffn(x, weights, build_plan(experts, E), up, down, gate)
    torch.testing.assert_close(out, dense_moe(x, experts, weights, up, down, gate), rtol=1e-10, atol=1e-10)


def _capacity_oracle(experts, capacity):
    """Plain loops: first choices first, then token order."""
    kept = experts.clone()
    load: dict[int, int] = {}
    for j in range(experts.shape[1]):
        for t in range(experts.shape[0]):
            e = int(experts[t, j])
            if e < 0:
                continue
            if load.get(e, 0) >= capacity:
                kept[t, j] = -1
            else:
                load[e] = load.get(e, 0) + 1
    return kept


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 30), E=st.integers(1, 6), k=st.integers(1, 3), cap=st.integers(1, 8), seed=st.integers(0, 999))
def test_property_capacity_matches_loop_oracle(T, E, k, cap, seed):
    k = min(k, E)
    gen = torch.Generator().manual_seed(seed)
    experts, weights = _routing(T, E, k, gen, empty=0.1)
    kept, w, dropped = apply_capacity(experts, weights, cap, E)
    assert torch.equal(kept, _capacity_oracle(experts, cap))
    assert torch.equal(w, weights.masked_fill(kept < 0, 0.0))
    assert dropped == int(((experts >= 0) & (kept < 0)).sum())
    counts = torch.bincount(kept.reshape(-1) + 1, minlength=E + 1)[1:]
    assert int(counts.max()) <= cap


def test_capacity_large_enough_keeps_everything():
    gen = torch.Generator().manual_seed(4)
    experts, weights = _routing(10, 4, 2, gen)
    kept, w, dropped = apply_capacity(experts, weights, 20, 4)
    assert dropped == 0 and torch.equal(kept, experts) and torch.equal(w, weights)


@pytest.mark.parametrize("backend", ["loop", ONEDNN])
def test_backward_twice_with_retain_graph(backend):
    gen = torch.Generator().manual_seed(6)
    experts, weights = _routing(12, 4, 2, gen)
    x = torch.randn(12, 8, generator=gen, requires_grad=True)
    up, down, gate = (p.float().requires_grad_() for p in _weights(4, 8, 12, True, gen))
    out = grouped_ffn(x, weights.float(), build_plan(experts, 4), up, down, gate, backend=backend)
    (g1,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("glu", [True, False])
def test_few_tokens_path_equals_grouped(glu):
    gen = torch.Generator().manual_seed(7)
    experts, weights = _routing(3, 5, 2, gen, empty=0.3)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    up, down, gate = _weights(5, 8, 12, glu, gen)
    want = grouped_ffn(x, weights, build_plan(experts, 5), up, down, gate, "gelu")
    torch.testing.assert_close(few_tokens_ffn(x, experts, weights, up, down, gate, "gelu"), want, rtol=1e-12, atol=1e-12)


def test_layer_decode_uses_few_tokens_path_with_same_result():
    from sparseforge.moe import MoE

    layer = MoE(8, 12, 6, 2, dtype=torch.float64).eval()
    x = torch.randn(1, 8, dtype=torch.float64)
    y_grad, aux_grad = layer(x)  # grad mode: grouped path
    with torch.no_grad():
        y_fast, aux_fast = layer(x)
    torch.testing.assert_close(y_fast, y_grad.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(aux_fast.tokens_per_expert, aux_grad.tokens_per_expert)
    assert aux_fast.tokens_per_expert.sum() == 2


def test_onednn_signature_is_pinned():
    """The private op "onednn" calls exists in the locked torch with the signatures the code passes."""
    op = torch.ops.mkldnn._linear_pointwise
    assert str(op.default._schema) == grouped.ONEDNN_SCHEMA["default"]
    assert str(op.binary._schema) == grouped.ONEDNN_SCHEMA["binary"]
    assert grouped.onednn_missing() is None


def test_a_changed_or_missing_private_op_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(grouped.ONEDNN_SCHEMA, "binary", "mkldnn::_linear_pointwise.binary(Tensor X) -> Tensor Y")
    grouped.onednn_missing.cache_clear()
    try:
        assert "not mkldnn::_linear_pointwise.binary(Tensor X)" in grouped.onednn_missing()
        with pytest.raises(ConfigError, match="backend='onednn' .*unavailable: torch .*_linear_pointwise.binary"):
            resolve_backend("onednn", torch.zeros(2, 2))
        assert resolve_backend("auto", torch.zeros(2, 2)) == "loop"  # the default never needs it
    finally:
        grouped.onednn_missing.cache_clear()
