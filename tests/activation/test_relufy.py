"""ReLU-fication: the activation swap, lossless skipping of exact zeros, the L1 penalty, recovery, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseforge.activation.cats import CATSMLP
from sparseforge.activation.relufy import ActivationL1, SquaredReLU, gate_sparsity, relu_sparse_, relufy_
from sparseforge.errors import ConfigError, ModelError
from sparseforge.finetune import FinetuneConfig, finetune_
from tiny_models import VOCAB, finetune_with_l1, tiny_model, tokens


class GLU(nn.Module):
    def __init__(self, d: int, f: int, act: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(1, 48), st.integers(1, 5), st.sampled_from(["relu2", "relu"]), st.integers(0, 2**31 - 1))
def test_skipping_the_exact_zeros_is_lossless(d, f, tokens_, act, seed):
    torch.manual_seed(seed)
    mlp = GLU(d, f, SquaredReLU() if act == "relu2" else nn.ReLU())
    model = nn.Sequential(mlp)
    x = torch.randn(tokens_, d)
    with torch.no_grad():
        dense = mlp(x)
        relu_sparse_(model)
        assert isinstance(model[0], CATSMLP) and model[0].threshold.item() == 0.0
        torch.testing.assert_close(model[0](x), dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[0](x[:1]), dense[:1], rtol=1e-5, atol=1e-5)  # batch-1 row-gather path


def test_relufied_model_runs_sparse_losslessly_at_the_measured_sparsity():
    model = tiny_model("llama")
    assert relufy_(model, "relu2") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert model.config.hidden_act == "relu2"
    ids = tokens(2, 16, seed=4)
    sparsity = gate_sparsity(model, ids)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    relu_sparse_(model)
    downs = [m.down_proj for m in model.modules() if isinstance(m, CATSMLP)]
    for layer in downs:
        layer.track_sparsity = True
    with torch.no_grad():
        sparse = model(input_ids=ids).logits
    measured = sum(d.skipped for d in downs) / sum(d.seen for d in downs)
    assert measured == pytest.approx(sparsity, abs=1e-6) and measured > 0.4  # random init: about half the gates <= 0
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_relu_sparse_refuses_a_silu_gate_and_relufy_an_unknown_activation():
    model = tiny_model("llama")
    with pytest.raises(ModelError, match="not ReLU-family"):
        relu_sparse_(model)
    with pytest.raises(ConfigError, match="relu2"):
        relufy_(model, "gelu")
    with pytest.raises(ModelError, match="no GLU MLP"):
        relufy_(tiny_model("gpt2"))


def test_l1_gradient_equals_that_of_the_explicit_penalty():
    torch.manual_seed(0)
    model = nn.ModuleDict({"mlp": GLU(8, 16, SquaredReLU())})
    x = torch.randn(3, 8)
    twin = copy.deepcopy(model)
    l1 = ActivationL1(model, peak=0.3, warmup=1)
    l1.step()
    assert l1.lam == pytest.approx(0.3)
    model["mlp"](x).sum().backward()
    l1.remove()
    acts = []
    handle = twin["mlp"].act_fn.register_forward_hook(lambda m, a, out: acts.append(out))
    out = twin["mlp"](x)
    (out.sum() + 0.3 * acts[0].abs().mean()).backward()
    handle.remove()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_progressive_l1_raises_the_sparsity_that_recovery_reaches():
    teacher = tiny_model("llama")
    plain, penalised = tiny_model("llama"), tiny_model("llama")
    relufy_(plain, "relu2")
    relufy_(penalised, "relu2")
    finetune_with_l1(plain, teacher, 0.0)
    finetune_with_l1(penalised, teacher, 2.0)
    ids = tokens(4, 32, seed=9)
    assert gate_sparsity(penalised, ids) > gate_sparsity(plain, ids) + 0.05


def test_finetune_refuses_a_dense_student_unless_allowed():
    model, teacher = tiny_model("llama"), tiny_model("llama")
    data = torch.randint(2, VOCAB, (2000,))
    with pytest.raises(ModelError, match="no pruned layer"):
        finetune_(model, FinetuneConfig(loss="kd", steps=1), teacher=teacher, data=data, kind="causal-lm",
                  evaluate=False, progress=False)
    with pytest.raises(ConfigError, match="compute='dense'"):
        finetune_(model, FinetuneConfig(loss="kd", steps=1, allow_dense=True, compute="csr"), teacher=teacher,
                  data=data, kind="causal-lm", evaluate=False, progress=False)


def test_relufied_sparse_model_round_trips_through_the_checkpoint(tmp_path):
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.loading import load

    model = tiny_model("llama")
    relufy_(model, "relu2")
    relu_sparse_(model)
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = save_pretrained(model, tmp_path / "c", compressed=False)
    plain = load(out, activation=False)  # transformers' own relu2 from config.hidden_act
    assert type(plain.model.layers[0].mlp.act_fn).__name__ == "ReLUSquaredActivation"
    relu_sparse_(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    loaded = load(out)
    assert loaded.config.hidden_act == "relu2"
    cats = [m for m in loaded.modules() if isinstance(m, CATSMLP)]
    assert len(cats) == 2 and all(m.threshold.item() == 0.0 for m in cats)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
