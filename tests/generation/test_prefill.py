"""The native engine's prompt forward: bfloat16 linears widened to float32 for the call where that measured faster;
float32 models and the unwidened path are the model's own forward, bitwise."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.generation import prefill
from sparseforge.generation.engine import DecodeEngine
from sparseforge.generation.prefill import prompt_forward, widened_bf16_linears, widening_pays
from tiny_models import tiny_model, tokens


def test_a_widened_layer_is_the_float32_product_rounded_once_and_its_forward_comes_back():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(40, 24).to(torch.bfloat16)
    keep = nn.Linear(40, 24)  # float32: left alone
    calls = []
    lin.register_forward_hook(lambda m, i, o: calls.append(o.dtype))
    x = torch.randn(5, 40, generator=g).bfloat16()
    own = lin(x)
    with widened_bf16_linears(nn.Sequential(lin, nn.Sequential(keep))) as n:
        got = lin(x)
        assert n == 1 and "forward" not in keep.__dict__
    expected = F.linear(x.float(), lin.weight.float(), lin.bias.float()).bfloat16()
    assert torch.equal(got, expected)
    assert (got.float() - own.float()).abs().max() <= 2 * own.float().abs().max() * 2**-8  # one bf16 rounding apart
    assert calls == [torch.bfloat16, torch.bfloat16]  # hooks run inside too
    assert "forward" not in lin.__dict__ and torch.equal(lin(x), own)


def test_the_layers_forward_comes_back_after_an_error():
    lin = nn.Linear(4, 2).to(torch.bfloat16)
    with pytest.raises(RuntimeError):
        with widened_bf16_linears(lin):
            lin(torch.ones(3, 5, dtype=torch.bfloat16))  # wrong width
    assert "forward" not in lin.__dict__


@pytest.mark.parametrize("pays", [False, True])
def test_prompt_forward_is_the_models_forward_or_its_widened_twin(monkeypatch, pays):
    monkeypatch.setattr(prefill, "widening_pays", lambda hidden, threads: pays)
    widened = []
    inner = prefill._widened
    monkeypatch.setattr(prefill, "_widened", lambda layer, x: widened.append(layer) or inner(layer, x))
    ids = tokens(1, 9, seed=3)
    f32 = tiny_model("llama", seed=2)
    with torch.inference_mode():
        assert torch.equal(prompt_forward(f32, ids).logits, f32(ids).logits)  # float32: never widened
        bf16 = copy.deepcopy(f32).to(torch.bfloat16)
        got, own = prompt_forward(bf16, ids).logits.float(), bf16(ids).logits.float()
    assert len(widened) == (sum(type(m) is nn.Linear for m in bf16.modules()) if pays else 0)
    if pays:
        assert (got - own).abs().max() <= 0.05 * own.abs().max()
        assert (got.argmax(-1) == own.argmax(-1)).float().mean() >= 0.85
    else:
        assert torch.equal(got, own)


def test_the_engine_prefills_through_prompt_forward(monkeypatch):
    seen = []
    monkeypatch.setattr(prefill, "widening_pays", lambda hidden, threads: seen.append(hidden) or True)
    model = tiny_model("llama", seed=2).to(torch.bfloat16)
    engine = DecodeEngine(copy.deepcopy(model), 16)
    logits = engine.prefill(tokens(1, 5, seed=1))
    assert seen == [model.config.hidden_size] and logits.shape == (model.config.vocab_size,)
    assert engine.length == 5


def test_widening_pays_measures_once_and_answers_from_the_cache():
    first, again = widening_pays(64, 1), widening_pays(64, 1)
    assert isinstance(first, bool) and first == again
