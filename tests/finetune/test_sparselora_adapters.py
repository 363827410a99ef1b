"""LoRA (peft) and SparseLoRA on tiny random HF models: token split, dense start, gradients, masked merge, finetune_."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.finetune import FinetuneConfig, finetune_, pruned_layers
from sparseforge.finetune.lora import attach_lora, lora_layers, masked_delta, merge_lora_, remove_lora_
from sparseforge.finetune.sparselora import SparseLoRA, SparseLoRAMLP, default_sparse_blocks, parse_layers
from sparseforge.finetune.sparselora_attention import ChannelSkipLinear
from sparseforge.layers import linear_layers, weight_2d
from sparseforge.masks import mask_from_scores, satisfies
from tiny_models import VOCAB, tiny_model

DATA = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))


def tiny_llama(layers=4, seed=0):
    import transformers as t

    torch.manual_seed(seed)
    cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB)
    return t.LlamaForCausalLM(cfg).eval()


def prune_blocks(model, pattern="unstructured", sparsity=0.5):
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in linear_layers(model):
            if ".layers." in name:
                w = weight_2d(modules[name])
                w.masked_fill_(~mask_from_scores(w.abs(), pattern, None if ":" in pattern else sparsity), 0.0)
    return model


def randomize_lora(model, seed=0):
    """Non-zero lora_B (peft initialises it to 0, which would hide every adapter effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.lora_B.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def sparse_llama(layers=4, sparsity=0.75, start=0.0, dense_tokens=0.25, which="all"):
    model = tiny_llama(layers)
    attach_lora(model, rank=4)
    randomize_lora(model)
    controller = SparseLoRA.attach(model, sparsity=sparsity, rank=8, start=start, dense_tokens=dense_tokens, layers=which)
    return model, controller


def test_default_layers_follow_the_paper():
    assert default_sparse_blocks(32) == list(range(3, 31))  # Llama-3-8B: first 3 and the last dense
    assert default_sparse_blocks(6) == [1, 2, 3, 4]
    assert parse_layers("1,3-4", 6) == [1, 3, 4] and parse_layers("all", 3) == [0, 1, 2]
    with pytest.raises(ConfigError, match="outside"):
        parse_layers("7", 6)
    with pytest.raises(ConfigError, match="block indices"):
        parse_layers("one", 6)


def test_context_tokens_sparse_and_output_tokens_dense():
    model, controller = sparse_llama(dense_tokens=0.25)
    mlp = next(iter(controller.modules.values()))
    assert isinstance(mlp, SparseLoRAMLP)
    mlp.train()
    x = torch.randn(2, 16, 32)
    out = mlp(x)
    n_ctx = controller.context_tokens(16)
    assert n_ctx == 12
    torch.testing.assert_close(out[:, n_ctx:], mlp.dense(x[:, n_ctx:]), rtol=0, atol=0)  # output tokens dense
    keep = mlp.last_kept
    assert keep.numel() == 16  # int(64 * 0.25)
    torch.testing.assert_close(out[:, :n_ctx], mlp.sparse(x[:, :n_ctx], keep))
    # the sparse part is the dense MLP with the skipped channels of the base removed
    g, u, d = (getattr(mlp, p).get_base_layer() for p in ("gate_proj", "up_proj", "down_proj"))
    skipped = torch.ones(64, dtype=torch.bool)
    skipped[keep] = False
    with torch.no_grad():
        saved = [g.weight.clone(), u.weight.clone(), d.weight.clone()]
        g.weight[skipped] = 0
        u.weight[skipped] = 0
        d.weight[:, skipped] = 0
        want = mlp.dense(x[:, :n_ctx])
        g.weight.copy_(saved[0]), u.weight.copy_(saved[1]), d.weight.copy_(saved[2])
    torch.testing.assert_close(out[:, :n_ctx], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, :n_ctx], mlp.dense(x[:, :n_ctx]), atol=1e-3)  # it did skip something


def test_dense_during_the_first_steps_and_in_eval_mode():
    model, controller = sparse_llama(start=0.1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = tiny_llama(4)  # the same weights and adapters, no SparseLoRA
    attach_lora(reference, rank=4)
    randomize_lora(reference)
    reference.train()
    model.train()
    with torch.no_grad():
        dense = reference(input_ids=ids).logits
        for step in range(10):  # ceil(0.1 * 100) = 10 dense steps
            controller.begin_step(step, 100)
            assert torch.equal(model(input_ids=ids).logits, dense)
        controller.begin_step(10, 100)
        assert controller.active
        assert not torch.allclose(model(input_ids=ids).logits, dense, atol=1e-4)
        model.eval()
        assert torch.equal(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


def test_gradient_flows_only_to_the_adapters():
    model, controller = sparse_llama()
    model.train()
    controller.begin_step(5, 10)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@settings(max_examples=15, deadline=None)
@given(pattern=st.sampled_from(["unstructured", "2:4", "1:4"]), sparsity=st.floats(0.2, 0.9), seed=st.integers(0, 2**16),
       rank=st.integers(1, 4))
def test_masked_merge_keeps_zeros_and_nm_and_equals_base_plus_masked_adapter(pattern, sparsity, seed, rank):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
            layer.weight.masked_fill_(~mask_from_scores(layer.weight.abs(), pattern, None if ":" in pattern else sparsity), 0)
    base = copy.deepcopy(net)
    attach_lora(net, rank=rank)
    randomize_lora(net, seed)
    x = torch.randn(5, 16, generator=g)
    deltas = {n: layer.get_delta_weight("default").detach().clone() for n, layer in lora_layers(net).items()}
    assert merge_lora_(net) == ["0", "2"]
    assert not lora_layers(net) and isinstance(net[0], nn.Linear)
    for name in ("0", "2"):
        w0, w1 = base.get_submodule(name).weight, net.get_submodule(name).weight
        kept = w0 != 0
        assert torch.equal(w1[~kept], torch.zeros_like(w1[~kept]))  # zeros stay zero
        torch.testing.assert_close(w1[kept], (w0 + deltas[name])[kept])  # base + adapter on the kept positions
        if ":" in pattern:
            assert satisfies(w1 != 0, pattern)
    # the merged model computes the base plus the masked adapter
    want = base
    with torch.no_grad():
        for name in ("0", "2"):
            layer = want.get_submodule(name)
            layer.weight += masked_delta(layer.weight, deltas[name])
    torch.testing.assert_close(net(x), want(x), rtol=1e-5, atol=1e-5)


def test_merge_without_the_mask_adds_the_dense_delta_explicitly():
    net = prune_blocks(tiny_llama(2))
    base = copy.deepcopy(net)
    attach_lora(net, rank=2)
    randomize_lora(net)
    layers = lora_layers(net)
    deltas = {n: layer.get_delta_weight("default").detach().clone() for n, layer in layers.items()}
    merge_lora_(net, keep_mask=False)
    for name, delta in deltas.items():
        torch.testing.assert_close(net.get_submodule(name).weight, base.get_submodule(name).weight + delta)
    assert not pruned_layers(net)  # the user asked for a dense model and got one


def test_remove_lora_restores_the_base_and_state_dict_names():
    net = tiny_llama(2)
    keys = set(net.state_dict())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    attach_lora(net, rank=2)
    SparseLoRA.attach(net, layers="all").remove()
    remove_lora_(net)
    assert set(net.state_dict()) == keys
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_bad_input_is_refused_with_one_line_errors():
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        attach_lora(tiny_llama(2), rank=0)
    with pytest.raises(ModelError, match="no linear layer"):
        attach_lora(nn.Sequential(nn.ReLU()), rank=4)
    with pytest.raises(ModelError, match="has none; use adapter 'lora'"):
        SparseLoRA.attach(tiny_model("gpt2"))
    net = tiny_llama(2)
    attach_lora(net, rank=2)
    with pytest.raises(ModelError, match="already carries LoRA"):
        attach_lora(net, rank=2)
    for kw, msg in [({"adapter": "dora"}, "adapter must be one of"), ({"lora_rank": 0}, "lora_rank must be"),
                    ({"lora_dropout": 1.0}, "lora_dropout must be"), ({"sparselora_sparsity": 1.0}, "sparselora_sparsity"),
                    ({"adapter": "lora", "compute": "csr"}, "frozen base"), ({"sparselora_layers": ""}, "sparselora_layers")]:
        with pytest.raises(ConfigError, match=msg):
            FinetuneConfig(**kw)


def run(student, **kw):
    cfg = FinetuneConfig(**{"loss": "ce", "steps": 4, "batch_size": 2, "seqlen": 16, "lr": 1e-2, **kw})
    return finetune_(student, cfg, data=DATA, evaluate=False, progress=False)


@pytest.mark.parametrize("adapter, pattern", [("lora", "unstructured"), ("sparselora", "unstructured"), ("sparselora", "2:4")])
def test_finetune_with_adapters_keeps_the_mask_and_merges(adapter, pattern):
    student = prune_blocks(tiny_llama(4), pattern)
    names = pruned_layers(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = run(student, adapter=adapter, sparselora_layers="1-2", sparselora_start=0.25)
    assert len(result.losses) == 4
    assert set(student.state_dict()) == set(before)  # plain layers again, adapters merged
    assert not lora_layers(student) and not any(isinstance(m, (SparseLoRAMLP, ChannelSkipLinear)) for m in student.modules())
    changed = 0
    for name in names:
        w0, w1 = before[f"{name}.weight"], weight_2d(student.get_submodule(name))
        assert torch.equal(w0 == 0, w1 == 0), name
        changed += not torch.equal(w0, w1)
    assert changed == len(names)  # every adapted layer moved
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(before[key], student.state_dict()[key])  # not adapted: frozen
    assert all(p.requires_grad for p in student.parameters())


def test_a_dense_base_is_fine_for_adapters_and_a_failed_run_leaves_it_untouched():
    student = tiny_llama(2)
    before = {k: v.clone() for k, v in student.state_dict().items()}

    def stop(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cfg = FinetuneConfig(loss="ce", steps=4, batch_size=2, seqlen=16, lr=1e-2, adapter="lora")
        finetune_(student, cfg, data=DATA, evaluate=False, progress=False, callback=stop)
    assert set(student.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    run(student, adapter="lora")  # no pruned layer: allowed with an adapter


def test_adapter_runs_resume_bit_exactly(tmp_path):
    kw = dict(adapter="sparselora", sparselora_layers="all", save_every=2)
    a = prune_blocks(tiny_llama(2))
    b = copy.deepcopy(a)
    run(a, **kw)

    def stop(info):
        if info.step == 2:
            raise KeyboardInterrupt

    cfg = FinetuneConfig(loss="ce", steps=4, batch_size=2, seqlen=16, lr=1e-2, **kw)
    with pytest.raises(KeyboardInterrupt):
        finetune_(copy.deepcopy(b), cfg, data=DATA, evaluate=False, progress=False, resume_dir=tmp_path, callback=stop)
    result = finetune_(b, cfg, data=DATA, evaluate=False, progress=False, resume_dir=tmp_path)
    assert result.resumed_from == 2
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("family, adapter", [("qwen2", "sparselora"), ("mistral", "sparselora"), ("gpt2", "lora")])
def test_adapters_on_other_families_keep_the_mask(family, adapter):
    student = tiny_model(family)
    modules = dict(student.named_modules())
    with torch.no_grad():
        for name in linear_layers(student):
            if ".layers." in name or ".h." in name:
                w = weight_2d(modules[name])  # (out, in) view, also of GPT-2's transposed Conv1D
                w.masked_fill_(~mask_from_scores(w.abs(), "2:4", None), 0.0)
    names = pruned_layers(student)
    before = {n: weight_2d(student.get_submodule(n)).clone() for n in names}
    run(student, adapter=adapter, sparselora_layers="all", sparselora_start=0.0)
    assert not lora_layers(student)
    for name in names:
        w = weight_2d(student.get_submodule(name))
        assert torch.equal(before[name] == 0, w == 0), name
        assert satisfies(w != 0, "2:4") and not torch.equal(before[name], w), name
