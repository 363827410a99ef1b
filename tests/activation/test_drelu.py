"""dReLU (Turbo Sparse): the MLP swap equals a hand-written dReLU MLP, its exact zeros are skipped
losslessly by relu_sparse_ / CATS, checkpoints restore it, generate works, recovery with ActivationL1."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseforge.activation.cats import CATSMLP
from sparseforge.activation.relufy import (
    UP_ACT_KEY, ActivationL1, DReLUMLP, gate_sparsity, relu_sparse_, relufy_, restore_mlp_variant_,
)
from sparseforge.errors import ConfigError, ModelError
from tiny_models import finetune_with_l1, tiny_model, tokens


def hand_drelu(mlp, x):
    """down(relu(gate(x)) * relu(up(x))) written out with the weights."""
    g = x @ mlp.gate_proj.weight.t()
    u = x @ mlp.up_proj.weight.t()
    return (torch.clamp(g, min=0) * torch.clamp(u, min=0)) @ mlp.down_proj.weight.t()


def test_relufy_drelu_swaps_the_mlps_and_equals_the_hand_written_mlp():
    model = tiny_model("llama")
    projections = [(m.mlp.gate_proj, m.mlp.up_proj, m.mlp.down_proj) for m in model.model.layers]
    names = relufy_(model, "drelu")
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for layer, (g, u, d) in zip(model.model.layers, projections):
        assert isinstance(layer.mlp, DReLUMLP)
        assert layer.mlp.gate_proj is g and layer.mlp.up_proj is u and layer.mlp.down_proj is d  # reused, not copied
    assert model.config.hidden_act == "relu" and getattr(model.config, UP_ACT_KEY) == "relu"
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        for layer in model.model.layers:
            torch.testing.assert_close(layer.mlp(x), hand_drelu(layer.mlp, x), rtol=1e-5, atol=1e-6)
    # the state dict keeps the names of the unmodified model
    assert sorted(model.state_dict()) == sorted(tiny_model("llama").state_dict())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 16), st.integers(1, 48), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_skipping_the_exact_zeros_of_both_factors_is_lossless(d, f, n, seed):
    torch.manual_seed(seed)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)
    mlp.act_fn = nn.SiLU()
    model = nn.ModuleDict({"mlp": mlp})
    relufy_(model, "drelu")
    x = torch.randn(n, d)
    with torch.no_grad():
        expected = hand_drelu(model["mlp"], x)
        relu_sparse_(model)
        assert isinstance(model["mlp"], CATSMLP) and isinstance(model["mlp"].up_act, nn.ReLU)
        torch.testing.assert_close(model["mlp"](x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model["mlp"](x[:1]), expected[:1], rtol=1e-5, atol=1e-5)  # batch-1 row gather


def test_down_proj_skips_the_zeros_of_the_product():
    model = tiny_model("llama")
    relufy_(model, "drelu")
    ids = tokens(2, 16, seed=4)
    sparsity = gate_sparsity(model, ids)  # zeros of relu(gate) * relu(up)
    assert sparsity > 0.6  # random init: about 3/4 of the products are zero
    relu_sparse_(model)
    downs = [m.down_proj for m in model.modules() if isinstance(m, CATSMLP)]
    for layer in downs:
        layer.track_sparsity = True
    with torch.no_grad():
        model(input_ids=ids)
    assert sum(d.skipped for d in downs) / sum(d.seen for d in downs) == pytest.approx(sparsity, abs=1e-6)


def test_drelu_checkpoint_round_trip_and_generate(tmp_path):
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.loading import load

    model = tiny_model("llama")
    relufy_(model, "drelu")
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = save_pretrained(model, tmp_path / "dense", compressed=False)
    for activation in (True, False):  # the MLP variant is the model's function, restored either way
        loaded = load(out, activation=activation)
        assert all(isinstance(layer.mlp, DReLUMLP) for layer in loaded.model.layers)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    # with the lossless skipping saved too (CATS threshold 0 in the activation section)
    relu_sparse_(model)
    out = save_pretrained(model, tmp_path / "sparse", compressed=False)
    loaded = load(out)
    cats = [m for m in loaded.modules() if isinstance(m, CATSMLP)]
    assert len(cats) == 2 and all(isinstance(m.up_act, nn.ReLU) for m in cats)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    generated = loaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        reference = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9) and torch.equal(generated, reference)


def test_compressed_sparse_load_restores_drelu_over_sparse_layers(tmp_path):
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.loading import load
    from sparseforge.nn import SparseLinear

    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.mul_(torch.rand_like(proj.weight) > 0.5)
    relufy_(model, "drelu")
    ids = tokens(1, 8, seed=2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = save_pretrained(model, tmp_path / "c", compressed=True)
    loaded = load(out, sparse=True)
    mlp = loaded.model.layers[0].mlp
    assert isinstance(mlp, DReLUMLP) and isinstance(mlp.up_proj, SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_bad_requests_are_clear_errors():
    model = tiny_model("llama")
    relufy_(model, "drelu")
    with pytest.raises(ModelError, match="dReLU MLP"):
        relufy_(model, "relu2")
    setattr(model.config, UP_ACT_KEY, "gelu")
    with pytest.raises(ConfigError, match=UP_ACT_KEY):
        restore_mlp_variant_(model)
    with pytest.raises(ModelError, match="GLU MLP"):
        DReLUMLP(nn.Linear(2, 2))


def test_recovery_with_progressive_l1_raises_the_drelu_sparsity():
    teacher = tiny_model("llama")
    plain, penalised = tiny_model("llama"), tiny_model("llama")
    relufy_(plain, "drelu")
    relufy_(penalised, "drelu")
    l1 = ActivationL1(penalised, peak=2.0, warmup=10)
    assert len(l1.handles) == 4  # gate and up activations of both MLPs
    l1.remove()
    finetune_with_l1(plain, teacher, 0.0)
    finetune_with_l1(penalised, teacher, 2.0)
    ids = tokens(4, 32, seed=9)
    assert gate_sparsity(penalised, ids) > gate_sparsity(plain, ids) + 0.03
    assert all(isinstance(layer.mlp, DReLUMLP) for layer in penalised.model.layers)
