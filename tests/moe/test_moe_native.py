"""Native few-token expert FFN (``sparseforge.ops.expert_ffn``, csrc/expert_gemv*): every ISA against the
scalar reference and a float64 oracle, odd sizes, 1-4 tokens, row-block splits, thread
independence, NaN/inf, errors, the custom op, and the MoE layer's decode path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.errors import ConfigError, DataError
from sparseforge.moe import MoE
from sparseforge.moe.grouped import few_tokens_ffn, grouped_ffn
from sparseforge.moe.dispatch import build_plan
from sparseforge.ops.expert_ffn import expert_ffn, moe_expert_ffn

N = kernels.native()
ISAS = [i for i in kernels.ISAS if kernels.cpu_supports(i)]


def _problem(T, k, E, d, h, glu=True, seed=0, empty=0.0, repeat=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen)
    w_up = torch.randn(E, d, h, generator=gen) * d**-0.5
    w_gate = torch.randn(E, d, h, generator=gen) * d**-0.5 if glu else None
    w_down = torch.randn(E, h, d, generator=gen) * h**-0.5
    if repeat:  # every slot of every token on expert 0 (more slots per expert than one GEMV group)
        experts = torch.zeros(T, k, dtype=torch.long)
    else:
        experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])  # (T, k)
    experts[torch.rand(T, k, generator=gen) < empty] = -1
    weights = torch.rand(T, k, generator=gen)
    return x, experts, weights, w_up, w_down, w_gate


def _oracle(x, experts, weights, w_up, w_down, w_gate, act):
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    return few_tokens_ffn(f64(x), experts, f64(weights), f64(w_up), f64(w_down), f64(w_gate), act)


def _native(x, experts, weights, w_up, w_down, w_gate, act, isa="", ref=False, block=0, parallel=True):
    y = torch.full(x.shape, float("nan"))
    fn = N.expert_ffn_ref if ref else N.expert_ffn
    g = None if w_gate is None else w_gate.numpy()
    fn(x.numpy(), experts.numpy(), weights.numpy(), w_up.numpy(), w_down.numpy(), g, y.numpy(), act, isa, block, parallel)
    return y


CASES = [  # T, k, E, d, h
    (1, 2, 8, 64, 96),
    (1, 8, 16, 37, 29),
    (2, 2, 4, 17, 50),
    (3, 3, 5, 101, 203),
    (4, 2, 6, 48, 33),
    (4, 4, 4, 9, 7),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("glu", [True, False])
def test_kernel_matches_reference_and_oracle(isa, case, glu):
    T, k, E, d, h = case
    prob = _problem(T, k, E, d, h, glu, seed=T * 100 + d, empty=0.2)
    want = _oracle(*prob, "silu")
    ref = _native(*prob, "silu", ref=True)
    got = _native(*prob, "silu", isa=isa)
    torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_activations(isa, act):
    prob = _problem(3, 2, 5, 40, 70, True, seed=3)
    torch.testing.assert_close(_native(*prob, act, isa=isa).double(), _oracle(*prob, act), rtol=1e-5, atol=1e-5)
    mlp = _problem(2, 2, 5, 40, 70, False, seed=4)
    torch.testing.assert_close(_native(*mlp, act, isa=isa).double(), _oracle(*mlp, act), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_env_selects_isa(isa, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    assert kernels.isa() == isa
    prob = _problem(2, 2, 4, 33, 45, seed=9)
    torch.testing.assert_close(_native(*prob, "silu").double(), _oracle(*prob, "silu"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block", [1, 37, 500, 4096])
def test_row_blocks_and_groups(isa, block):
    """Tiny blocks split each matrix into many row blocks (summed afterwards); `repeat` puts 6
    slots on one expert (two GEMV groups)."""
    for repeat in (False, True):
        prob = _problem(3, 2, 4, 29, 41, seed=5, repeat=repeat)
        got = _native(*prob, "silu", isa=isa, block=block)
        torch.testing.assert_close(got.double(), _oracle(*prob, "silu"), rtol=1e-5, atol=1e-5)


def test_result_independent_of_threads():
    prob = _problem(4, 2, 4, 256, 512, seed=6)  # big enough to use the pool
    base = _native(*prob, "silu", parallel=False)
    old = kernels.num_threads()
    try:
        for n in (1, 2, 3):
            kernels.set_num_threads(n)
            assert torch.equal(_native(*prob, "silu", parallel=True), base)
    finally:
        kernels.set_num_threads(old)


def test_empty_slots_and_no_slots():
    x, experts, weights, w_up, w_down, w_gate = _problem(2, 2, 3, 8, 5, seed=1)
    experts[:] = -1
    assert torch.equal(_native(x, experts, weights, w_up, w_down, w_gate, "silu"), torch.zeros(2, 8))
    experts[1, 0] = 2
    want = _oracle(x, experts, weights, w_up, w_down, w_gate, "silu")
    torch.testing.assert_close(_native(x, experts, weights, w_up, w_down, w_gate, "silu").double(), want)
    assert torch.equal(want[0], torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("isa", ISAS)
def test_nonfinite_propagate_like_torch(isa):
    x, experts, weights, w_up, w_down, w_gate = _problem(3, 2, 4, 24, 20, seed=2)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    w_down[experts[2, 0], 4, 7] = float("-inf")
    want = few_tokens_ffn(x, experts, weights, w_up, w_down, w_gate)
    got = _native(x, experts, weights, w_up, w_down, w_gate, "silu", isa=isa)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 4), k=st.integers(1, 4), E=st.integers(1, 6), d=st.integers(1, 70), h=st.integers(1, 70),
    glu=st.booleans(), seed=st.integers(0, 2**16), block=st.sampled_from([0, 1, 64]),
)
def test_property_kernel_equals_oracle(T, k, E, d, h, glu, seed, block):
    k = min(k, E)
    prob = _problem(T, k, E, d, h, glu, seed=seed, empty=0.25)
    want = _oracle(*prob, "silu")
    for isa in ISAS:
        torch.testing.assert_close(_native(*prob, "silu", isa=isa, block=block).double(), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    x, experts, weights, w_up, w_down, w_gate = _problem(1, 2, 3, 8, 5)
    bad = experts.clone()
    bad[0, 0] = 3
    with pytest.raises(DataError, match="outside"):
        expert_ffn(x, bad, weights, w_up, w_down, w_gate)
    with pytest.raises(DataError, match="float32"):
        expert_ffn(x.double(), experts, weights, w_up, w_down, w_gate)
    with pytest.raises(DataError, match="int64"):
        expert_ffn(x, experts.int(), weights, w_up, w_down, w_gate)
    with pytest.raises(DataError, match="shape"):
        expert_ffn(x, experts, weights, w_up, w_down[:, :4], w_gate)
    with pytest.raises(ConfigError, match="activation"):
        expert_ffn(x, experts, weights, w_up, w_down, w_gate, activation="tanh")


def test_custom_op_and_compile():
    prob = _problem(2, 2, 4, 16, 24, seed=8)
    torch.library.opcheck(moe_expert_ffn, (*prob, "silu", False))
    want = expert_ffn(*prob)
    assert torch.equal(moe_expert_ffn(*prob, "silu", False), want)
    fn = torch.compile(lambda x: expert_ffn(x, *prob[1:]), fullgraph=True, backend="eager")
    assert torch.equal(fn(prob[0]), want)


# ---- the MoE layer's decode path


@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("E,k", [(8, 2), (16, 8)])
def test_layer_native_decode_equals_grouped_and_torch(T, E, k):
    torch.manual_seed(T)
    layer = MoE(24, 40, E, k, shared_hidden=16, decode_backend="native").eval()
    x = torch.randn(T, 24)
    y_grad, aux_grad = layer(x)  # grad mode: grouped path
    with torch.no_grad():
        y_native, aux_native = layer(x)
        layer.decode_backend = "torch"
        y_torch, _ = layer(x)
    torch.testing.assert_close(y_native, y_grad.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_native, y_torch, rtol=1e-5, atol=1e-6)
    assert torch.equal(aux_native.tokens_per_expert, aux_grad.tokens_per_expert)


def test_layer_uses_native_kernel(monkeypatch):
    import sparseforge.moe.layer as layer_mod

    calls = []
    real = layer_mod.native_expert_ffn
    monkeypatch.setattr(layer_mod, "native_expert_ffn", lambda *a: calls.append(a) or real(*a))
    layer = MoE(8, 12, 4, 2, decode_backend="native").eval()
    with torch.no_grad():
        layer(torch.randn(1, 3, 8))  # 3 tokens: native
        layer(torch.randn(5, 8))  # 5 tokens: grouped
        layer.decode_backend = "torch"
        layer(torch.randn(1, 8))
    assert len(calls) == 1 and calls[0][7] is False  # too small for the pool: the calling thread, unmeasured
    x = torch.randn(2, 8)
    with torch.no_grad():
        layer.decode_backend, layer.decode_parallel = "native", True
        a, _ = layer(x)
        layer.decode_parallel = False
        assert torch.equal(layer(x)[0], a)


def test_auto_decode_backend_measures_once_and_remembers(monkeypatch, tmp_path):
    import sparseforge.moe.layer as layer_mod
    import sparseforge.measure.choose as choose_mod

    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    native_calls, timed = [], []
    real_native, real_choose = layer_mod.native_expert_ffn, choose_mod.choose_by_timing
    monkeypatch.setattr(layer_mod, "native_expert_ffn", lambda *a: native_calls.append(1) or real_native(*a))
    monkeypatch.setattr(choose_mod, "choose_by_timing",
                        lambda *a, **kw: timed.append(a[1]) or real_choose(*a, **{**kw, "budget_s": 0.01}))
    layer = MoE(16, 24, 8, 2).eval()  # decode_backend="auto"
    x = torch.randn(1, 16)
    with torch.no_grad():
        y = layer(x)[0]
        layer(x)  # same shape: no second measurement
        layer(torch.randn(2, 16))  # two tokens: measured for that shape
    assert [q["tokens"] for q in timed] == [1, 2]
    choices = layer.decode_choice
    assert set(choices) == {1, 2} and all(c.name in ("native", "torch") and c.ms for c in choices.values())
    assert "measured on this machine" in choices[1].reason
    with torch.no_grad():
        layer.decode_backend = "torch"
        torch.testing.assert_close(y, layer(x)[0], rtol=1e-5, atol=1e-6)  # whichever path auto took
        layer.decode_backend = "auto"
    fresh = MoE(16, 24, 8, 2).eval()  # a new layer of the same shape: the answer comes from the on-disk cache
    with torch.no_grad():
        fresh(x)
    assert fresh.decode_choice[1].cached and fresh.decode_choice[1].name == choices[1].name
    assert native_calls  # the native kernel ran (timed, and used if it won)


def test_auto_decode_times_the_thread_pool_too_and_uses_the_winner(monkeypatch, tmp_path):
    import sparseforge.measure.choose as choose_mod
    import sparseforge.moe.layer as layer_mod
    from sparseforge.measure.timing import Measurement, Timing

    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    timed, native_calls = [], []

    def pool_wins(fns, **kw):  # a settled measurement: the pool clearly fastest
        timed.append(sorted(fns))
        ms = {"native": 1.0, "native-parallel": 0.5, "torch": 0.9}
        t = {k: Timing(ms[k], ms[k] * 0.99, ms[k] * 1.01, ms[k] * 0.98, ms[k] * 0.99, ms[k] * 1.01, 30) for k in fns}
        return Measurement(t, 30, True, 0.1, {k: (v.median_ms / 1e3,) * 30 for k, v in t.items()})

    monkeypatch.setattr(choose_mod, "time_interleaved", pool_wins)
    real = layer_mod.native_expert_ffn
    monkeypatch.setattr(layer_mod, "native_expert_ffn", lambda *a: native_calls.append(a[-1]) or real(*a))
    old = kernels.num_threads()
    try:
        kernels.set_num_threads(2)
        layer = MoE(64, 192, 4, 2).eval()  # 2 slots x 3 x 64 x 192 weights: enough for the pool
        x = torch.randn(1, 64)
        with torch.no_grad():
            y = layer(x)[0]
        assert timed == [["native", "native-parallel", "torch"]]
        assert layer.decode_choice[1].name == "native-parallel" and native_calls == [True]
        layer.decode_parallel = False  # fixed: no pool candidate, a new question
        with torch.no_grad():
            layer(x)
        assert timed[-1] == ["native", "torch"]
        kernels.set_num_threads(1)  # one thread: the pool is not a candidate
        layer.decode_parallel = None
        with torch.no_grad():
            layer(x)
        assert timed[-1] == ["native", "torch"]
        layer.decode_backend = "torch"
        with torch.no_grad():
            torch.testing.assert_close(layer(x)[0], y, rtol=1e-5, atol=1e-6)
    finally:
        kernels.set_num_threads(old)


def test_decode_parallel_must_be_none_or_bool():
    with pytest.raises(ConfigError, match="decode_parallel"):
        MoE(8, 12, 4, 2, decode_parallel=1)


def test_layer_decode_backend_errors():
    with pytest.raises(ConfigError, match="decode_backend"):
        MoE(8, 12, 4, 2, decode_backend="fast")
    layer = MoE(8, 12, 4, 2, decode_backend="native", dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ConfigError, match="float32"):
        layer(torch.randn(1, 8, dtype=torch.float64))
    auto = MoE(8, 12, 4, 2, dtype=torch.float64)  # auto: float64 takes the torch chain
    x = torch.randn(1, 8, dtype=torch.float64)
    with torch.no_grad():
        y, _ = auto(x)
    torch.testing.assert_close(y, auto(x)[0].detach(), rtol=1e-12, atol=1e-12)


def test_layer_grouped_equals_native_for_mlp_experts():
    torch.manual_seed(0)
    layer = MoE(16, 20, 5, 2, expert="mlp", activation="gelu").eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        y, _ = layer(x)
    experts, weights, _ = layer.router(layer.gate(x))
    want = grouped_ffn(x.double(), weights.double(), build_plan(experts, 5), layer.w_up.double(), layer.w_down.double(),
                       None, "gelu")
    torch.testing.assert_close(y.double(), want.detach(), rtol=1e-5, atol=1e-6)


def test_auto_decode_backend_is_keyed_per_cpu_and_shape(monkeypatch, tmp_path):
    import sparseforge.measure.choose as choose_mod
    import sparseforge.measure.tuning_cache as tc
    from sparseforge.measure.timing import Measurement, Timing

    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    timed = []

    def torch_wins(fns, **kw):  # a settled measurement: the torch path clearly faster
        timed.append(1)
        t = {"torch": Timing(0.5, 0.49, 0.51, 0.48, 0.49, 0.51, 30), "native": Timing(1.0, 0.99, 1.01, 0.98, 0.99, 1.01, 30)}
        return Measurement(t, 30, True, 0.1, {k: (v.median_ms / 1e3,) * 30 for k, v in t.items()})

    monkeypatch.setattr(choose_mod, "time_interleaved", torch_wins)
    x = torch.randn(1, 16)

    def decode_choice(d_hidden=24, tokens=1):
        layer = MoE(16, d_hidden, 8, 2).eval()
        with torch.no_grad():
            layer(torch.randn(tokens, 16))
        return layer.decode_choice[tokens]

    first = decode_choice()
    assert first.name == "torch" and not first.cached and len(timed) == 1
    assert decode_choice().cached and len(timed) == 1  # same CPU and shape: the cache answers
    assert not decode_choice(d_hidden=32).cached and len(timed) == 2  # another expert width
    assert not decode_choice(tokens=2).cached and len(timed) == 3  # another token count
    real_fp = tc.cpu_fingerprint
    monkeypatch.setattr(tc, "cpu_fingerprint", lambda threads: {**real_fp(threads), "cpu": "Another CPU"})
    assert not decode_choice().cached and len(timed) == 4  # another CPU model never reuses the answer
    machines = {e["machine"]["cpu"] for e in tc.TuningCache().entries() if e["kind"] == "moe_decode"}
    assert machines == {real_fp(1)["cpu"], "Another CPU"}
    with torch.no_grad():
        MoE(16, 24, 8, 2).eval()(x)


def test_noisy_decode_measurement_keeps_the_native_default_uncached(monkeypatch, tmp_path):
    import sparseforge.measure.choose as choose_mod
    from sparseforge.measure.timing import Measurement, Timing
    from sparseforge.measure.tuning_cache import TuningCache

    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))

    def noisy(fns, **kw):  # torch looks 20% faster, but the intervals overlap and nothing settled
        t = {"torch": Timing(0.8, 0.5, 1.3, 0.4, 0.5, 1.3, 9), "native": Timing(1.0, 0.6, 1.5, 0.5, 0.6, 1.5, 9)}
        return Measurement(t, 9, False, 0.2, {k: (v.median_ms / 1e3,) * 9 for k, v in t.items()})

    monkeypatch.setattr(choose_mod, "time_interleaved", noisy)
    layer = MoE(16, 24, 8, 2).eval()
    with torch.no_grad():
        layer(torch.randn(1, 16))
    choice = layer.decode_choice[1]
    assert choice.name == "native" and "too noisy" in choice.reason
    assert TuningCache().entries() == []


def test_auto_decode_times_each_path_together_with_the_router(monkeypatch, tmp_path):
    """The decode candidates are timed as consecutive steps run them: the router's projection, then
    the experts (the pool's workers and torch's threads take turns on the cores in between)."""
    import sparseforge.measure.choose as choose_mod
    import sparseforge.moe.layer as layer_mod
    from sparseforge.measure.timing import Measurement, Timing

    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path))
    layer = MoE(64, 192, 4, 2).eval()
    routed = []
    real = layer_mod.few_token_linear
    monkeypatch.setattr(layer_mod, "few_token_linear", lambda *a: routed.append(1) or real(*a))
    per_path = {}

    def run_each(fns, **kw):
        for name, fn in fns.items():
            before = len(routed)
            fn()
            per_path[name] = len(routed) - before
        t = {k: Timing(1.0, 0.99, 1.01, 0.98, 0.99, 1.01, 30) for k in fns}
        return Measurement(t, 30, True, 0.1, {k: (1e-3,) * 30 for k in fns})

    monkeypatch.setattr(choose_mod, "time_interleaved", run_each)
    old = kernels.num_threads()
    try:
        kernels.set_num_threads(2)
        with torch.no_grad():
            layer(torch.randn(1, 64))
    finally:
        kernels.set_num_threads(old)
    assert per_path == {"native": 1, "native-parallel": 1, "torch": 1}


LINEAR_CASES = [(1, 1024, 64), (1, 1024, 8), (2, 37, 5), (3, 7, 3), (4, 100, 17), (7, 65, 9), (1, 0, 4), (0, 16, 4)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_few_token_linear_matches_reference_and_torch(isa, case):
    T, d, n = case
    gen = torch.Generator().manual_seed(T * 1000 + d + n)
    x, w = torch.randn(T, d, generator=gen), torch.randn(n, d, generator=gen)
    want = x.double() @ w.double().t()  # (T, n)
    ref, got = torch.full((T, n), float("nan")), torch.full((T, n), float("nan"))
    N.few_token_linear_ref(x.numpy(), w.numpy(), ref.numpy())
    N.few_token_linear(x.numpy(), w.numpy(), got.numpy(), isa)
    tol = 1e-6 * max(d, 1) ** 0.5
    torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=tol)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=tol)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=tol)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 4), d=st.integers(1, 300), n=st.integers(1, 70), seed=st.integers(0, 2**31 - 1),
       isa=st.sampled_from(ISAS))
def test_few_token_linear_property(T, d, n, seed, isa):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(T, d, generator=gen), torch.randn(n, d, generator=gen)
    got = torch.empty(T, n)
    N.few_token_linear(x.numpy(), w.numpy(), got.numpy(), isa)
    torch.testing.assert_close(got.double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-5 * d**0.5)


def test_few_token_linear_errors():
    from sparseforge.ops.expert_ffn import few_token_linear

    with pytest.raises(DataError, match="float32"):
        few_token_linear(torch.randn(1, 8, dtype=torch.float64), torch.randn(4, 8))
    with pytest.raises(DataError, match=r"\(N, d\)"):
        few_token_linear(torch.randn(1, 8), torch.randn(4, 9))
    with pytest.raises(DataError, match="2-D"):
        few_token_linear(torch.randn(8), torch.randn(4, 8))


def test_decode_router_runs_natively_and_gives_torch_logits(monkeypatch):
    import sparseforge.moe.layer as layer_mod

    calls = []
    real = layer_mod.few_token_linear
    monkeypatch.setattr(layer_mod, "few_token_linear", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = MoE(48, 64, 16, 4, decode_backend="native", decode_parallel=False).eval()  # nothing to measure
    x = torch.randn(3, 48)
    with torch.no_grad():
        _, aux = layer(x)
    assert calls == [1]
    torch.testing.assert_close(aux.router_logits, layer.gate(x).detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer(torch.randn(5, 48))  # more than NATIVE_MAX_TOKENS: the grouped path, torch's router
        layer.decode_backend = "torch"
        layer(x)
    assert calls == [1]
    layer.decode_backend = "auto"
    layer(x)  # gradients needed: torch's router, differentiable
    assert calls == [1]


@pytest.mark.parametrize("renormalize,shared,k,tokens", [(True, None, 2, 1), (False, 12, 3, 3), (True, None, 4, 2)])
def test_fused_decode_step_equals_the_unfused_native_path(monkeypatch, renormalize, shared, k, tokens):
    import sparseforge.moe.layer as layer_mod

    calls = []
    real = layer_mod.native_expert_ffn
    monkeypatch.setattr(layer_mod, "native_expert_ffn", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(3)
    layer = MoE(8, 12, 4, k, decode_backend="native", shared_hidden=shared,
                router_options={"renormalize": renormalize}).eval()
    x = torch.randn(tokens, 8)
    with torch.no_grad():
        y0, a0 = layer(x)  # unfused: decides the path and records it
        y1, a1 = layer(x)  # fused: router and experts in one native call
        layer.decode_backend = "torch"
        y2, _ = layer(x)  # the per-slot torch chain (never fused)
    assert len(calls) == 1 and layer._decode_steps
    assert torch.allclose(y1, y0, atol=1e-6) and torch.allclose(y1, y2, rtol=1e-5, atol=1e-6)
    assert torch.equal(a1.experts, a0.experts) and torch.equal(a1.tokens_per_expert, a0.tokens_per_expert)
    assert torch.allclose(a1.router_probs, a0.router_probs, atol=1e-7)
    assert torch.allclose(a1.router_logits, a0.router_logits, atol=1e-6)
    assert torch.allclose(a1.loss, a0.loss, atol=1e-7)


def test_fused_decode_ties_keep_the_lower_expert_and_gradients_disable_it():
    layer = MoE(8, 12, 5, 2, decode_backend="native").eval()
    with torch.no_grad():
        layer.gate.weight.zero_()  # every logit equal: experts 0 and 1, weight 1/2 each
        x = torch.randn(1, 8)
        layer(x)
        y, aux = layer(x)
        ref = 0.5 * (layer(x)[0])  # same call again: the fused step is deterministic
    assert aux.experts.tolist() == [[0, 1]] and torch.equal(y, 2 * ref)
    xg = x.clone().requires_grad_()
    yg, _ = layer(xg)  # a gradient is needed: the grouped path, differentiable
    assert yg.requires_grad and torch.allclose(yg, y, atol=1e-6)
