"""Sparse upcycling: experts are copies of the dense MLP; logits equal the dense model's at init."""

from __future__ import annotations

import copy

import pytest
import torch

import transformers

from sparseforge.errors import ConfigError, ModelError  # noqa: E402
from sparseforge.moe.swap import MoEBlock  # noqa: E402
from sparseforge.moe.upcycle import gated_mlps, upcycle_, upcycle_mlp  # noqa: E402


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_experts_are_copies_and_router_is_normal():
    model = _tiny_llama()
    mlp = model.model.layers[0].mlp
    moe = upcycle_mlp(mlp, num_experts=64, k=2, router_std=0.5, seed=3)
    for e in range(64):
        assert torch.equal(moe.w_gate[e], mlp.gate_proj.weight.t())
        assert torch.equal(moe.w_up[e], mlp.up_proj.weight.t())
        assert torch.equal(moe.w_down[e], mlp.down_proj.weight.t())
    w = moe.gate.weight.detach()
    assert abs(float(w.mean())) < 0.05 and abs(float(w.std()) - 0.5) < 0.05
    assert not moe.training  # mode of the dense MLP
    # the expert weights are independent parameters, not views of one storage
    with torch.no_grad():
        moe.w_up[0].zero_()
    assert moe.w_up[1].abs().sum() > 0


@pytest.mark.parametrize("router,options", [("softmax_topk", None), ("sparsemixer", {"estimator": "midpoint"})])
def test_tiny_llama_logits_equal_at_init(router, options):
    model = _tiny_llama()
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    report = upcycle_(model, num_experts=4, k=2 if router == "softmax_topk" else 1, router=router,
                      router_options=options)
    assert report.upcycled == [f"model.layers.{i}.mlp" for i in range(4)] and report.kept_dense == []
    assert all(isinstance(layer.mlp, MoEBlock) for layer in model.model.layers)
    with torch.no_grad():
        out = model(ids).logits
    if router == "softmax_topk":  # renormalised top-k weights sum to one
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # SparseMixer's weight is pi_D (< 1 unless every other expert is masked): outputs are scaled
        assert not torch.allclose(out, ref, atol=1e-3)


def test_unnormalised_weights_change_the_output():
    model = _tiny_llama(1)
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
    upcycle_(model, num_experts=8, k=2, router_options={"renormalize": False}, router_std=0.02)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max() > 1e-3  # weights sum to ~2/8, not 1: the equality test can fail


def test_every_other_and_explicit_layers():
    model = _tiny_llama()
    names = gated_mlps(model)
    report = upcycle_(copy.deepcopy(model), layers="every_other")
    assert report.upcycled == [names[1], names[3]] and report.kept_dense == [names[0], names[2]]
    report = upcycle_(copy.deepcopy(model), layers=[2])
    assert report.upcycled == [names[2]]
    with pytest.raises(ConfigError, match="out of range"):
        upcycle_(copy.deepcopy(model), layers=[4])
    with pytest.raises(ConfigError, match="layers must be"):
        upcycle_(copy.deepcopy(model), layers="all")


def test_routers_differ_between_layers_and_training_works():
    model = _tiny_llama().train()
    upcycle_(model, num_experts=4, k=2, seed=7)
    r0, r1 = model.model.layers[0].mlp.moe.gate.weight, model.model.layers[1].mlp.moe.gate.weight
    assert not torch.equal(r0, r1)
    ids = torch.randint(0, 101, (2, 9))
    model(ids, labels=ids).loss.backward()
    assert r0.grad is not None and r0.grad.abs().sum() > 0


def test_errors():
    cfg = transformers.MixtralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=50, intermediate_size=48)
    with pytest.raises(ModelError, match="no Llama-style gated MLP"):
        upcycle_(transformers.MixtralForCausalLM(cfg))
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   vocab_size=50, mlp_bias=True)
    with pytest.raises(ModelError, match="biases"):
        upcycle_(transformers.LlamaForCausalLM(cfg))
    with pytest.raises(ConfigError, match="k=3"):
        upcycle_(_tiny_llama(), num_experts=2, k=3)


def test_builtin_model_logits_equal_at_init():
    from sparseforge.io.models import load_model

    lm = load_model("builtin")
    model = lm.model
    ids = lm.tokenizer("Upcycling keeps the dense function at initialisation.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    report = upcycle_(model, num_experts=8, k=2, seed=0)
    assert len(report.upcycled) == model.config.num_hidden_layers
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
