"""Whole models: quantize_, sparsify_ with quantization, recipes, and the scale buffers across save / load."""

import json

import pytest
import torch

import transformers  # noqa: F401  (test dependency: missing means failure)
from tiny_models import tiny_model, tokens  # noqa: E402

from sparseforge.config import SparsifyConfig, dump_recipe, parse_recipe  # noqa: E402
from sparseforge.errors import ConfigError, NumericalError  # noqa: E402
from sparseforge.io.checkpoint import save_pretrained  # noqa: E402
from sparseforge.io.loading import load, load_sparse  # noqa: E402
from sparseforge.layers import find_blocks, select_targets, weight_2d  # noqa: E402
from sparseforge.masks import satisfies  # noqa: E402
from sparseforge.prune.sparsify import sparsify_  # noqa: E402
from sparseforge.quant import SCALE_BUFFER, QuantConfig, quantize_  # noqa: E402
from sparseforge.quant.grid import codes_of  # noqa: E402


def targets_of(model):
    prefix, _ = find_blocks(model)
    modules = dict(model.named_modules())
    return {n: modules[n] for n in select_targets(model, None, [], prefix)}


def check_contract(model, bits, group_size=None):
    """Every target: float32 scale buffer of the documented shape, weight exactly codes * scale."""
    layers = targets_of(model)
    assert layers
    for name, module in layers.items():
        scale = getattr(module, SCALE_BUFFER)
        w = weight_2d(module)
        assert scale.dtype == torch.float32, name
        rows, cols = w.shape
        assert tuple(scale.shape) == ((rows,) if group_size is None else (rows, cols // group_size)), name
        assert f"{name}.{SCALE_BUFFER}" in model.state_dict()  # persistent: saved with the model
        codes_of(w, scale, bits, group_size)
    return layers


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 16)])
def test_joint_sparsify_quantize_whole_model(family, bits, group_size):
    model = tiny_model(family)
    cfg = SparsifyConfig(method="sparsegpt", pattern="2:4", method_options={"blocksize": 16},
                         quantize=QuantConfig(bits=bits, group_size=group_size, method="joint"))
    report = sparsify_(model, cfg, calibration=tokens(8, 16), progress=False)
    for name, module in check_contract(model, bits, group_size).items():
        assert satisfies(weight_2d(module) != 0, "2:4"), name
    assert all(l.info["quantization"] == cfg.quantize.describe() for l in report.layers)
    assert "weight_scale" not in report.layers[0].info  # tensors stay out of the report
    json.dumps(report.sparsity_config())  # the checkpoint block is JSON
    assert report.sparsity_config()["quantization"]["layers"] == [l.name for l in report.layers]
    assert torch.isfinite(model(input_ids=tokens(2, 8)).logits).all()


def test_rtn_after_any_method_keeps_the_mask():
    model = tiny_model("llama")
    sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.6), progress=False)
    zeros = {n: weight_2d(m) == 0 for n, m in targets_of(model).items()}
    model2 = tiny_model("llama")
    sparsify_(model2, SparsifyConfig(method="magnitude", sparsity=0.6, quantize=QuantConfig(bits=4)), progress=False)
    for name, module in check_contract(model2, 4).items():
        assert torch.all((weight_2d(module) == 0) >= zeros[name]), name  # every pruned entry is still 0


def test_quantize_alone_and_all_pruned_rows():
    model = tiny_model("llama")
    layers = targets_of(model)
    first = next(iter(layers.values()))
    weight_2d(first)[2].zero_()  # a row that is all zeros
    report = quantize_(model, QuantConfig(bits=8))
    assert report.layers == list(layers)
    check_contract(model, 8)
    assert getattr(first, SCALE_BUFFER)[2] == 0 and torch.all(weight_2d(first)[2] == 0)
    assert torch.isfinite(model(input_ids=tokens(2, 8)).logits).all()


def test_bad_input_is_refused_before_anything_changes():
    model = tiny_model("llama")
    layers = list(targets_of(model).values())
    weight_2d(layers[-1])[0, 0] = float("nan")
    before = weight_2d(layers[0]).clone()
    with pytest.raises(NumericalError, match="NaN or inf"):
        quantize_(model, QuantConfig(bits=8))
    assert torch.equal(weight_2d(layers[0]), before) and not hasattr(layers[0], SCALE_BUFFER)
    with pytest.raises(ConfigError, match="inside SparseGPT"):
        quantize_(tiny_model("llama"), QuantConfig(method="joint"))
    with pytest.raises(ConfigError, match="method 'sparsegpt'"):
        SparsifyConfig(method="wanda", quantize={"bits": 8, "method": "joint"})
    with pytest.raises(ConfigError, match="does not divide"):
        sparsify_(tiny_model("llama"), SparsifyConfig(method="magnitude", quantize={"bits": 4, "group_size": 24}),
                  progress=False)
    with pytest.raises(ConfigError, match="unknown key"):
        SparsifyConfig(quantize={"bitz": 8})
    quantized = tiny_model("llama")
    quantize_(quantized, QuantConfig(bits=8))
    before = {k: v.clone() for k, v in quantized.state_dict().items()}
    with pytest.raises(ConfigError, match="already quantized"):
        sparsify_(quantized, SparsifyConfig(method="magnitude", sparsity=0.5), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in quantized.state_dict().items())  # nothing changed
    sparsify_(quantized, SparsifyConfig(method="magnitude", sparsity=0.5, quantize={"bits": 4}), progress=False)
    check_contract(quantized, 4)  # a stage that quantizes again may prune it


def test_recipe_round_trip_with_quantize():
    cfg = SparsifyConfig(method="sparsegpt", pattern="2:4", quantize=QuantConfig(bits=4, group_size=32, method="joint"))
    text = dump_recipe([cfg])
    assert "quantize" in text
    assert parse_recipe(text) == [cfg]
    assert parse_recipe("stages:\n  - {method: sparsegpt, quantize: {bits: 8, method: joint}}\n")[0].quantize == \
        QuantConfig(bits=8, method="joint")


@pytest.mark.parametrize("compressed", [True, False])
def test_scales_survive_save_and_load(tmp_path, compressed):
    model = tiny_model("llama")
    report = sparsify_(model, SparsifyConfig(method="sparsegpt", pattern="2:4", method_options={"blocksize": 16},
                                             quantize=QuantConfig(bits=8, method="joint")),
                       calibration=tokens(8, 16), progress=False)
    out = save_pretrained(model, tmp_path / "m", compressed=compressed, sparsity_config=report.sparsity_config())
    block = json.loads((out / "config.json").read_text())["sparsity_config"]
    assert block["quantization"]["bits"] == 8 and block["quantization"]["buffer"] == SCALE_BUFFER
    loaded = load(out)
    state, back = model.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys()
    for key in state:
        assert torch.equal(state[key], back[key]), key
    check_contract(loaded, 8)
    if compressed:
        sparse = load_sparse(out)
        for name, module in targets_of(model).items():
            assert torch.equal(getattr(sparse.get_submodule(name), SCALE_BUFFER), getattr(module, SCALE_BUFFER))
        ids = tokens(2, 8)
        assert torch.allclose(sparse(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_a_scale_that_does_not_fit_its_layer_is_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from sparseforge.errors import ModelError

    model = tiny_model("llama")
    quantize_(model, QuantConfig(bits=8))
    out = save_pretrained(model, tmp_path / "d", compressed=False, sparsity_config={})
    file = out / "model.safetensors"
    state = load_file(str(file))
    key = next(k for k in state if k.endswith(SCALE_BUFFER))
    state[key] = state[key][:-1].clone()  # one output channel short
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="output channels"):
        load(out)
