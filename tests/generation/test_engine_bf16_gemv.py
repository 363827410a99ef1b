"""The decode engine's native bf16 GEMV: which projections bind it, the probe rule that admits it
(:func:`within_bf16_sum_order`), and bf16 greedy tokens against transformers' ``generate``."""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError
from sparseforge.generation import engine as engine_mod
from sparseforge.generation.engine import DecodeEngine, within_bf16_sum_order
from sparseforge.generation.loop import native_generate
from sparseforge.ops.dense_bf16 import BoundDenseBf16, dense_bf16_gemv
from tiny_models import tiny_model, tokens


def _llama(hidden=256, ffn=512, layers=2, vocab=96, seed=0, **overrides):
    import transformers as t

    torch.manual_seed(seed)
    cfg = t.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, vocab_size=vocab, **overrides)
    return t.LlamaForCausalLM(cfg).eval()


def _callers(engine):
    p = engine._layers[0]
    return [p.qkv, p.o_proj, p.gate_up, p.down, engine._lm_head]


def test_bf16_projections_and_lm_head_run_the_native_gemv():
    engine = DecodeEngine(tiny_model("llama", seed=3).to(torch.bfloat16), 16)
    assert all(isinstance(c, BoundDenseBf16) for c in _callers(engine))
    assert engine.call_paths == {"bound": 2 * 4 + 1}


def test_opting_out_or_a_float32_model_keeps_f_linear():
    for model, kw in ((tiny_model("llama", seed=3).to(torch.bfloat16), {"bf16_gemv": False}), (tiny_model("llama", seed=3), {})):
        engine = DecodeEngine(model, 16, **kw)
        assert all(isinstance(c, partial) and c.func is F.linear for c in _callers(engine))
    with pytest.raises(ConfigError, match="bf16_gemv"):
        DecodeEngine(tiny_model("llama").to(torch.bfloat16), 16, bf16_gemv="yes")


def test_a_gemv_outside_the_rule_is_not_bound(monkeypatch):
    class Off(BoundDenseBf16):  # one output element 4 bf16 steps off
        def __call__(self, x):
            y = super().__call__(x)
            y[0, 0] = y[0, 0] * (1 + 2.0**-6) + 1.0
            return y

    monkeypatch.setattr(engine_mod, "BoundDenseBf16", Off)
    engine = DecodeEngine(_llama().to(torch.bfloat16), 16)
    callers = _callers(engine)
    assert not any(isinstance(c, BoundDenseBf16) for c in callers)
    assert all(isinstance(c, partial) and c.func is F.linear for c in callers)


def test_greedy_tokens_equal_generate_with_the_gemv_on_a_wider_llama():
    model = _llama(seed=1).to(torch.bfloat16)
    ids = tokens(1, 9, seed=3)
    new = 24
    with torch.inference_mode():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)
    got = native_generate(copy.deepcopy(model), ids, max_new_tokens=new, min_new_tokens=new)
    assert isinstance(DecodeEngine(copy.deepcopy(model), 40)._lm_head, BoundDenseBf16)
    assert torch.equal(got, expected), (got, expected)


def _case(out, inp, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g).bfloat16()
    x = (torch.randn(1, inp, generator=g) * scale).bfloat16()
    b = torch.randn(out, generator=g).bfloat16()
    return w, x, b


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 300), inp=st.integers(1, 3000), seed=st.integers(0, 10_000),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), with_bias=st.booleans())
def test_the_rule_admits_the_gemv_against_f_linear(out, inp, seed, scale, with_bias):
    w, x, b = _case(out, inp, seed, scale)
    b = b if with_bias else None
    assert within_bf16_sum_order(dense_bf16_gemv(x, w, b), F.linear(x, w, b), x, w, b)


def test_the_rule_rejects_more_than_rounding_nan_moves_and_other_dtypes():
    w, x, b = _case(64, 512, seed=4)
    own = F.linear(x, w, b)
    ok = dense_bf16_gemv(x, w, b)
    assert within_bf16_sum_order(ok, own, x, w, b)
    big = own.float().abs().argmax()
    off = own.clone().view(-1)
    off[big] = float(off[big]) * (1 + 2.0**-5)  # 4 bf16 steps on the largest element
    assert not within_bf16_sum_order(off.view(1, -1), own, x, w, b)
    nan = own.clone()
    nan[0, 3] = float("nan")
    assert not within_bf16_sum_order(nan, own, x, w, b)
    assert not within_bf16_sum_order(own.float(), own, x, w, b)
    assert not within_bf16_sum_order(own[:, :10], own, x, w, b)


@pytest.mark.parametrize("bf16_gemv", [True, False])
def test_a_step_with_the_gemv_runs_torch_ops_on_one_thread_and_restores_the_setting(bf16_gemv):
    engine = DecodeEngine(tiny_model("llama", seed=3).to(torch.bfloat16), 16, bf16_gemv=bf16_gemv)
    seen = []
    head = engine._lm_head
    engine._lm_head = lambda x: (seen.append(torch.get_num_threads()), head(x))[1]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine.prefill(tokens(1, 3, seed=1))
        engine.step(5)
        assert seen == [1 if bf16_gemv else 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _pool_model(kind: str):
    """A tiny Llama whose projections run on the pool ("bf16 gemv", "sparse") or on torch ("bf16 torch")."""
    import sparseforge as sf
    from sparseforge.runtime.compress import compress_

    model = tiny_model("llama", seed=3)
    if kind == "sparse":
        sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", pattern="2:4"), progress=False)
        compress_(model, format="nm")
        return DecodeEngine(model, 16)
    return DecodeEngine(model.to(torch.bfloat16), 16, bf16_gemv=kind == "bf16 gemv")


@pytest.mark.parametrize("kind", ["bf16 gemv", "bf16 torch", "sparse"])
def test_a_step_holds_the_pool_through_its_layers_only_for_pool_projections_and_one_torch_thread(kind):
    """The layers of a step run with the pool's workers polling (kernels.pool_held) when some projection runs on
    the pool and torch is on one thread (the bf16 GEMV's step, or inside sparse_threads); the lm_head runs after
    the release; projections on torch, or a step whose torch ops keep two threads, hold nothing."""
    from sparseforge import kernels

    engine = _pool_model(kind)
    holders = []
    head = engine._lm_head
    engine._lm_head = lambda x: (holders.append(("head", kernels.native().pool_holders())), head(x))[1]
    if engine._glued is None:  # the step's torch ops (bf16)
        layer = engine._layers[0].o_proj
        engine._layers[0] = dataclasses.replace(engine._layers[0], o_proj=lambda x: (
            holders.append(("o_proj", kernels.native().pool_holders())), layer(x))[1])
    else:  # the float32 step's native calls
        first, glued = engine._glued
        call = glued[0].o_proj
        glued[0] = dataclasses.replace(glued[0], o_proj=lambda: (holders.append(("o_proj", kernels.native().pool_holders())), call())[1])
    before, pool_before = torch.get_num_threads(), kernels.num_threads()
    torch.set_num_threads(2)
    kernels.set_num_threads(2)
    try:
        engine.prefill(tokens(1, 3, seed=1))
        engine.step(5)
        assert holders == [("o_proj", 1 if kind == "bf16 gemv" else 0), ("head", 0)]
        holders.clear()
        with kernels.sparse_threads(2):
            engine.step(6)
        assert holders == [("o_proj", 0 if kind == "bf16 torch" else 1), ("head", 0)]
        assert kernels.native().pool_holders() == 0
    finally:
        torch.set_num_threads(before)
        kernels.set_num_threads(pool_before)
