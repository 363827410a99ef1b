"""Activation thresholds inside the compressed checkpoint (sparsity_config.activation) and back through load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import sparseforge
from sparseforge.activation import ActivationSparsityConfig, ColumnSparseLinear, SparseInputLinear, sparse_input_layers, sparsify_activations_
from sparseforge.activation.cats import CATSMLP
from sparseforge.config import CalibrationConfig, SparsifyConfig
from sparseforge.errors import ConfigError, ModelError
from sparseforge.io import validation
from sparseforge.io.checkpoint import save_pretrained
from sparseforge.io.layout import read_safetensors_header, read_sparsity_config
from sparseforge.io.loading import load
from tiny_models import tiny_model, tokens


def _activation_sparse(method="teal", prune=True, sparsity=0.5):
    model = tiny_model("llama")
    if prune:
        sparseforge.sparsify_(model, SparsifyConfig(method="magnitude", pattern="2:4"), progress=False)
    report = sparsify_activations_(model, ActivationSparsityConfig(
        method=method, sparsity=sparsity, calibration=CalibrationConfig(batch_size=4)), calibration=tokens(8, 16),
        progress=False)
    return model, report


def _logits(model, ids=None):
    ids = tokens(2, 12, seed=3) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("method", ["teal", "cats"])
def test_thresholds_round_trip_and_the_loaded_model_runs_sparse(tmp_path, method, compressed):
    model, report = _activation_sparse(method)
    expected = _logits(model)
    out = save_pretrained(model, tmp_path / "c", compressed=compressed,
                          sparsity_config={"method": "magnitude", "pattern": "2:4", "targets": None, "ignore": []})
    # the saved model keeps its sparse layers; the file holds the unmodified model's tensor names
    assert len(sparse_input_layers(model)) == (14 if method == "teal" else 2)
    names = set(read_safetensors_header(out / "model.safetensors")) if compressed else set()
    assert not any(n.endswith((".weight_t", ".threshold")) for n in names)
    block = read_sparsity_config(out)
    assert block["format_version"] == validation.ACTIVATION_VERSION
    section = block["activation"]["layers"]
    assert set(section) == {t.name for t in report.layers}
    for t in report.layers:
        entry = section[t.name]
        assert entry["kind"] == ("linear" if method == "teal" else "cats") and entry["method"] == method
        assert entry["threshold"] == pytest.approx(t.threshold) and entry["sparsity"] == pytest.approx(t.sparsity)
        assert entry["calibrated_sparsity"] == pytest.approx(t.calibration_sparsity)

    loaded = load(out)
    modules = dict(loaded.named_modules())
    for t in report.layers:
        assert isinstance(modules[t.name], SparseInputLinear if method == "teal" else CATSMLP)
        assert modules[t.name].threshold.item() == pytest.approx(t.threshold)
    torch.testing.assert_close(_logits(loaded), expected)
    # not the dense model: the thresholds change the output
    dense = load(out, activation=False)
    assert not sparse_input_layers(dense) and not any(isinstance(m, CATSMLP) for m in dense.modules())
    assert not torch.allclose(_logits(dense), expected, atol=1e-4)


def test_resaving_a_loaded_model_keeps_its_thresholds_and_drops_removed_ones(tmp_path):
    model, _ = _activation_sparse("teal")
    out = save_pretrained(model, tmp_path / "a", sparsity_config={"method": "magnitude", "pattern": "2:4"})
    loaded = load(out)
    again = save_pretrained(loaded, tmp_path / "b")  # block inherited from loaded.config
    assert read_sparsity_config(again)["activation"] == read_sparsity_config(out)["activation"]
    dense = load(out, activation=False)
    plain = save_pretrained(dense, tmp_path / "c")
    assert "activation" not in read_sparsity_config(plain)  # never inherited from the config


def test_infinite_and_per_channel_thresholds_survive(tmp_path):
    model = tiny_model("llama")
    modules = dict(model.named_modules())
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"
    per_channel = torch.linspace(0.0, 0.3, 32)
    model.get_submodule("model.layers.0.self_attn").q_proj = SparseInputLinear.from_linear(modules[q], threshold=math.inf)
    model.get_submodule("model.layers.1.self_attn").o_proj = SparseInputLinear.from_linear(modules[o], threshold=per_channel)
    out = save_pretrained(model, tmp_path / "c", compressed=False)
    loaded = load(out)
    assert math.isinf(loaded.get_submodule(q).threshold.item())
    torch.testing.assert_close(loaded.get_submodule(o).threshold, per_channel)
    torch.testing.assert_close(_logits(loaded), _logits(model))


def test_bfloat16_weights_and_thresholds_round_trip_bit_exactly(tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    sparsify_activations_(model, ActivationSparsityConfig(sparsity=0.4, calibration=CalibrationConfig(batch_size=4)),
                          calibration=tokens(4, 16), progress=False)
    out = save_pretrained(model, tmp_path / "c", sparsity_config={"method": "none", "pattern": "unstructured"},
                          compressed=True)
    loaded = load(out)
    assert loaded.dtype == torch.bfloat16
    for name, layer in sparse_input_layers(model).items():
        assert loaded.get_submodule(name).weight_t.dtype == torch.bfloat16
        assert torch.equal(loaded.get_submodule(name).weight_t, layer.weight_t), name
        assert torch.equal(loaded.get_submodule(name).threshold, layer.threshold), name
    # (a dense bf16 tiny Llama itself reloads with logits within one bf16 ulp, not bitwise)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0.02, atol=4e-3)


def _edit_block(out, edit):
    path = out / "config.json"
    data = json.loads(path.read_text())
    edit(data["sparsity_config"])
    path.write_text(json.dumps(data))


def test_an_older_reader_refuses_with_a_version_error(tmp_path, monkeypatch):
    model, _ = _activation_sparse("teal", prune=False)
    out = save_pretrained(model, tmp_path / "c", compressed=False)
    monkeypatch.setattr(validation, "FORMAT_VERSION", validation.ACTIVATION_VERSION - 1)
    with pytest.raises(ModelError, match="format_version 4.*upgrade sparseforge"):
        load(out)


def test_bad_sections_are_one_line_errors_naming_the_layer(tmp_path):
    model, _ = _activation_sparse("teal")
    out = save_pretrained(model, tmp_path / "c", sparsity_config={"method": "magnitude", "pattern": "2:4"})
    q = "model.layers.0.self_attn.q_proj"
    cases = [
        (lambda b: b.update(format_version=3), ModelError, "activation needs format_version >= 4"),
        (lambda b: b["activation"]["layers"][q].update(threshold=-1.0), ModelError, f"{q}.*threshold"),
        (lambda b: b["activation"]["layers"][q].update(kind="relu"), ModelError, f"{q}.*kind"),
        (lambda b: b["activation"]["layers"][q].update(threshold=[0.1, 0.2]), ModelError,
         f"{q} has 32 input features but 2 thresholds"),
        (lambda b: b["activation"]["layers"].update({"model.layers.7.mlp.up_proj": {"kind": "linear", "threshold": 0}}),
         ModelError, "no layer model.layers.7.mlp.up_proj"),
        (lambda b: b["activation"]["layers"].update({"model.norm": {"kind": "linear", "threshold": 0}}),
         ModelError, "model.norm is a LlamaRMSNorm"),
        (lambda b: b.update(activation={"layers": {}}), ModelError, "at least one layer"),
    ]
    original = (out / "config.json").read_text()
    for edit, error, message in cases:
        (out / "config.json").write_text(original)
        _edit_block(out, edit)
        with pytest.raises(error, match=message):
            load(out)


def test_sparse_load_of_a_packed_activation_sparse_layer_builds_the_column_layout(tmp_path):
    model, _ = _activation_sparse("teal")
    out = save_pretrained(model, tmp_path / "c", sparsity_config={"method": "magnitude", "pattern": "2:4"})
    loaded = load(out, sparse=True)
    layers = sparse_input_layers(loaded)
    assert set(layers) == set(sparse_input_layers(model)) and len(layers) == 14
    assert all(isinstance(m, ColumnSparseLinear) and m.weight_sparsity() == pytest.approx(0.5) for m in layers.values())
    for name, m in sparse_input_layers(model).items():
        assert torch.equal(layers[name].threshold, m.threshold.float())
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-4, atol=1e-4)
    loaded = load(out, sparse=True, activation=False)
    assert not sparse_input_layers(loaded)


def test_sparse_load_applies_thresholds_to_layers_kept_dense(tmp_path):
    model = tiny_model("llama")
    sparseforge.sparsify_(model, SparsifyConfig(method="magnitude", pattern="2:4", targets=["*mlp*"]), progress=False)
    sparsify_activations_(model, ActivationSparsityConfig(sparsity=0.5, targets=["*self_attn*"],
                                                          calibration=CalibrationConfig(batch_size=4)),
                          calibration=tokens(4, 16), progress=False)
    out = save_pretrained(model, tmp_path / "c", sparsity_config={"method": "magnitude", "pattern": "2:4",
                                                                 "targets": None})
    loaded = load(out, sparse=True)
    assert set(sparse_input_layers(loaded)) == set(sparse_input_layers(model))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-4, atol=1e-4)


def test_inspect_shows_per_layer_thresholds_and_calibrated_sparsity(tmp_path):
    from sparseforge.io.inspection import format_report, inspect_path

    model, report = _activation_sparse("teal")
    out = save_pretrained(model, tmp_path / "c", sparsity_config={"method": "magnitude", "pattern": "2:4"})
    result = inspect_path(out)
    rows = {r["name"]: r for r in result["activation"]}
    assert set(rows) == {t.name for t in report.layers}
    for t in report.layers:
        assert rows[t.name]["threshold"] == pytest.approx(t.threshold)
        assert rows[t.name]["calibrated_sparsity"] == pytest.approx(t.calibration_sparsity)
    text = format_report(result)
    q = report.layers[0]
    line = next(line for line in text.splitlines() if line.startswith(q.name + " "))
    assert f"{q.threshold:.4g}" in line and f"{q.calibration_sparsity:.1%}" in line and "teal" in line


def test_cli_activation_options_build_the_config():
    from sparseforge.cli import activation_config_from_args, build_parser

    args = build_parser().parse_args(["prune", "builtin", "--out", "x", "--samples", "4", "--seqlen", "32",
                                      "--activation-sparsity", "0.4", "--activation-method", "cats"])
    cfg = activation_config_from_args(args)
    assert (cfg.method, cfg.sparsity, cfg.allocation) == ("cats", 0.4, "uniform")
    assert (cfg.calibration.samples, cfg.calibration.seqlen) == (4, 32)
    assert activation_config_from_args(build_parser().parse_args(["prune", "builtin", "--out", "x"])) is None
    bad = build_parser().parse_args(["prune", "builtin", "--out", "x", "--activation-sparsity", "1.2"])
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        activation_config_from_args(bad)


@pytest.mark.slow
def test_cli_prune_with_activation_sparsity_then_inspect(tmp_path, capsys):
    from sparseforge.cli import main

    out = tmp_path / "p"
    assert main(["prune", "builtin", "--method", "magnitude", "--sparsity", "0.5", "--samples", "4", "--seqlen", "32",
                 "--no-eval", "--no-progress", "--activation-sparsity", "0.5", "--out", str(out)]) == 0
    assert "TEAL uniform activation sparsity 50% on 42 projections" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "activation sparsity: 42 layers" in text and "model.layers.5.mlp.down_proj" in text
    assert len(sparse_input_layers(load(out))) == 42
