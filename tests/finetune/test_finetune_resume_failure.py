"""A resume that fails leaves the student exactly as it came: weights, modules, hooks, requires_grad."""

import copy

import pytest
import torch

from sparseforge.errors import ConfigError
from sparseforge.finetune import FinetuneConfig, S2FTConfig, finetune_
from sparseforge.finetune.loop import STATE_FILE
from sparseforge.layers import linear_layers, weight_2d
from sparseforge.masks import mask_from_scores
from tiny_models import VOCAB, tiny_model

DATA = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))
ADAPTERS = {"none": {}, "lora": {"adapter": "lora"}, "sparselora": {"adapter": "sparselora", "sparselora_layers": "all",
                                                                     "sparselora_start": 0.0},
            "s2ft": {"adapter": "s2ft", "s2ft": S2FTConfig(budget=0.2, parts="q,v,o,up,down")}}


def pruned_llama(hidden=32):
    import transformers as t

    torch.manual_seed(0)
    model = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in linear_layers(model):
            if ".layers." in name:
                w = weight_2d(modules[name])
                w.masked_fill_(~mask_from_scores(w.abs(), "unstructured", 0.5), 0.0)
    return model.eval()


def config(adapter):
    return FinetuneConfig(loss="ce", steps=4, batch_size=2, seqlen=16, lr=1e-2, save_every=2, **ADAPTERS[adapter])


def interrupted_state(adapter, resume_dir):
    def stop(info):
        if info.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_(pruned_llama(), config(adapter), data=DATA, evaluate=False, progress=False, resume_dir=resume_dir,
                  callback=stop)
    return torch.load(resume_dir / STATE_FILE, weights_only=False)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
            model.training)


def assert_same(model, before):
    weights, types, grads, hooks, training = before
    now = snapshot(model)
    assert set(now[0]) == set(weights)
    for k, v in weights.items():
        assert torch.equal(now[0][k], v), k
    assert now[1] == types and now[2] == grads and now[3] == hooks


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_a_resume_failing_after_the_weights_loaded_restores_them(adapter, tmp_path):
    state = interrupted_state(adapter, tmp_path)
    # a state whose weights load but whose optimizer does not: the weights are in the model when it fails
    state["optimizer"]["param_groups"].append(copy.deepcopy(state["optimizer"]["param_groups"][0]))
    torch.save(state, tmp_path / STATE_FILE)
    student = pruned_llama()
    before = snapshot(student)
    with pytest.raises(ConfigError, match="does not fit this model") as err:
        finetune_(student, config(adapter), data=DATA, evaluate=False, progress=False, resume_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert_same(student, before)
    fresh = pruned_llama()  # and the student still trains like a fresh one
    finetune_(fresh, config(adapter), data=DATA, evaluate=False, progress=False)
    finetune_(student, config(adapter), data=DATA, evaluate=False, progress=False)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k


@pytest.mark.parametrize("adapter", ["none", "sparselora", "s2ft"])
def test_a_state_of_another_model_shape_is_a_one_line_error_and_changes_nothing(adapter, tmp_path):
    interrupted_state(adapter, tmp_path)
    student = pruned_llama(hidden=48)  # the same layer names, other shapes
    before = snapshot(student)
    with pytest.raises(ConfigError, match="does not fit this model") as err:
        finetune_(student, config(adapter), data=DATA, evaluate=False, progress=False, resume_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert_same(student, before)
