import pytest
import torch
from torch import nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.layers import find_blocks, is_linear, linear_layers, select_targets, weight_2d

import transformers  # noqa: F401  (test dependency: missing means failure)
from tiny_models import FAMILIES, tiny_model  # noqa: E402

EXPECTED_BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gpt2": "transformer.h",
                   "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers", "bert": "encoder.layer"}


@pytest.mark.parametrize("family", FAMILIES)
def test_find_blocks_every_family(family):
    model = tiny_model(family)
    name, blocks = find_blocks(model)
    assert name == EXPECTED_BLOCKS[family] and len(blocks) == 2
    targets = select_targets(model, None, [], name)
    assert targets and all(t.startswith(name + ".") for t in targets)
    assert not any("lm_head" in t or "embed" in t for t in targets)


def test_conv1d_weight_view_is_out_in_and_writes_through():
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D(nf=128, nx=32): weight (32, 128)
    assert is_linear(conv)
    w = weight_2d(conv)
    assert w.shape == (conv.nf, conv.weight.shape[0])
    w[0, 0] = 123.0
    assert conv.weight[0, 0] == 123.0
    x = torch.randn(3, 32)
    assert torch.allclose(conv(x), x @ weight_2d(conv).T + conv.bias, atol=1e-5)


def test_select_targets_globs_regex_ignore():
    model = tiny_model("llama")
    t = select_targets(model, ["*.mlp.*"], ["*.down_proj"], "model.layers")
    assert t and all(".mlp." in n and "down_proj" not in n for n in t)
    t2 = select_targets(model, ["re:model\\.layers\\.0\\..*_proj"], [], "model.layers")
    assert all(n.startswith("model.layers.0.") for n in t2) and len(t2) == 7
    assert "lm_head" in select_targets(model, ["lm_head"], [], None)


def test_select_targets_errors():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="matches no linear layer"):
        select_targets(model, ["*.nonexistent"], [], "model.layers")
    with pytest.raises(ConfigError, match="leave no layer"):
        select_targets(model, None, ["*"], "model.layers")


def test_no_blocks_is_a_clear_error():
    with pytest.raises(ModelError, match="repeated transformer blocks"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert list(linear_layers(nn.Sequential(nn.Linear(4, 4)))) == ["0"]
