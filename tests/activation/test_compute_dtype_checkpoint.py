"""The compute dtype of column layers (pruned + activation-sparse) survives save -> sparseforge.load.

A ``ColumnSparseLinear`` running bf16 compute writes ``compute_dtype: "bfloat16"`` in its entry of
``sparsity_config.activation``; ``load(sparse=True)`` rebuilds the column layer with it, so the
loaded model's outputs are bitwise those of the saved one, at prefill (the bf16 product) and decode.
"""

from __future__ import annotations

import json

import pytest
import torch

import sparseforge
from sparseforge.activation import (ActivationSparsityConfig, ColumnSparseLinear, column_sparse_, sparse_input_layers,
                                    sparsify_activations_)
from sparseforge.activation.storage import activation_layers
from sparseforge.config import CalibrationConfig, SparsifyConfig
from sparseforge.errors import ConfigError, ModelError
from sparseforge.io.checkpoint import save_pretrained
from sparseforge.io.layout import read_sparsity_config
from sparseforge.io.loading import load
from tiny_models import tiny_model, tokens

PRUNE = {"method": "magnitude", "pattern": "2:4"}


def _column_model(compute_dtype=torch.bfloat16, only=None):
    model = tiny_model("llama")
    sparseforge.sparsify_(model, SparsifyConfig(method="magnitude", pattern="2:4"), progress=False)
    sparsify_activations_(model, ActivationSparsityConfig(sparsity=0.4, calibration=CalibrationConfig(batch_size=4)),
                          calibration=tokens(4, 16), progress=False)
    column_sparse_(model, min_weight_sparsity=0.5)
    for name, m in sparse_input_layers(model).items():
        if only is None or name in only:
            m.set_compute_dtype(compute_dtype)
    return model.eval()


def _logits(model, batch, seqlen):
    with torch.no_grad():
        return model(input_ids=tokens(batch, seqlen, seed=5)).logits


def test_bf16_compute_dtype_is_saved_and_restored_with_bitwise_equal_outputs(tmp_path):
    model = _column_model()
    layers = sparse_input_layers(model)
    assert len(layers) == 14 and all(isinstance(m, ColumnSparseLinear) for m in layers.values())
    out = save_pretrained(model, tmp_path / "c", sparsity_config=PRUNE)
    section = read_sparsity_config(out)["activation"]["layers"]
    assert {e.get("compute_dtype") for e in section.values()} == {"bfloat16"}

    loaded = load(out, sparse=True)
    restored = sparse_input_layers(loaded)
    assert set(restored) == set(layers)
    for name, m in restored.items():
        assert isinstance(m, ColumnSparseLinear) and m.compute_dtype == torch.bfloat16, name
        assert torch.equal(m.values, layers[name].values) and torch.equal(m.threshold, layers[name].threshold), name
    for batch, seqlen in ((2, 12), (1, 1)):  # 24 rows: the bf16 product; 1 row: the decode GEMV
        assert torch.equal(_logits(loaded, batch, seqlen), _logits(model, batch, seqlen)), (batch, seqlen)
    # the bf16 product really ran: float32 compute of the same layers differs
    for m in restored.values():
        m.set_compute_dtype(torch.float32)
    assert not torch.equal(_logits(loaded, 2, 12), _logits(model, 2, 12))


def test_float32_layers_write_no_key_and_a_mixed_model_keeps_each_layer_dtype(tmp_path):
    q = "model.layers.0.self_attn.q_proj"
    model = _column_model(only={q})
    entries = activation_layers(model)
    assert entries[q]["compute_dtype"] == "bfloat16"
    assert all("compute_dtype" not in e for n, e in entries.items() if n != q)  # float32: the default, not written
    loaded = load(save_pretrained(model, tmp_path / "m", sparsity_config=PRUNE), sparse=True)
    dtypes = {n: m.compute_dtype for n, m in sparse_input_layers(loaded).items()}
    assert dtypes[q] == torch.bfloat16 and set(v for n, v in dtypes.items() if n != q) == {torch.float32}
    assert torch.equal(_logits(loaded, 2, 12), _logits(model, 2, 12))
    again = save_pretrained(loaded, tmp_path / "again")  # a re-save of the loaded model keeps the entry
    assert read_sparsity_config(again)["activation"] == read_sparsity_config(tmp_path / "m")["activation"]


def test_a_dense_load_builds_sparse_input_layers_with_the_same_thresholds(tmp_path):
    model = _column_model()
    loaded = load(save_pretrained(model, tmp_path / "c", sparsity_config=PRUNE))
    layers = sparse_input_layers(loaded)
    assert len(layers) == 14 and not any(isinstance(m, ColumnSparseLinear) for m in layers.values())
    torch.testing.assert_close(_logits(loaded, 1, 1), _logits(model, 1, 1), rtol=1e-4, atol=1e-4)


def _edit(out, edit):
    path = out / "config.json"
    data = json.loads(path.read_text())
    edit(data["sparsity_config"]["activation"]["layers"])
    path.write_text(json.dumps(data))


def test_bad_compute_dtypes_are_one_line_errors_naming_the_layer(tmp_path):
    q = "model.layers.0.self_attn.q_proj"
    out = save_pretrained(_column_model(), tmp_path / "c", sparsity_config=PRUNE)
    original = (out / "config.json").read_text()
    for edit in (lambda layers: layers[q].update(compute_dtype="float16"),
                 lambda layers: layers[q].update(compute_dtype=16)):
        (out / "config.json").write_text(original)
        _edit(out, edit)
        with pytest.raises(ModelError, match=rf"{q}.*compute_dtype"):
            load(out, sparse=True)
    (out / "config.json").write_text(original)
    before = read_sparsity_config(out)
    from sparseforge.activation.storage import apply_activation_layers_

    fresh = load(out, sparse=True, activation=False)
    layers = dict(before["activation"]["layers"])
    layers[q] = dict(layers[q], compute_dtype="half")
    with pytest.raises(ConfigError, match=f"{q} has compute_dtype 'half'"):
        apply_activation_layers_(fresh, layers, "test")
    assert not sparse_input_layers(fresh)  # checked before anything was swapped


def test_bf16_compute_on_an_int8_layer_is_refused_before_anything_changes(tmp_path):
    from sparseforge.activation.storage import apply_activation_layers_
    from sparseforge.quant import QuantConfig, quantize_

    model = tiny_model("llama")
    sparseforge.sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.5), progress=False)
    quantize_(model, QuantConfig(bits=8))
    out = save_pretrained(model, tmp_path / "q", sparsity_config={"method": "magnitude", "sparsity": 0.5})
    loaded = load(out, sparse=True)
    q = "model.layers.0.self_attn.q_proj"
    layers = {q: {"kind": "linear", "threshold": 0.1, "compute_dtype": "bfloat16"},
              "model.layers.0.self_attn.k_proj": {"kind": "linear", "threshold": 0.1}}
    with pytest.raises(ModelError, match=f"{q} has int8 values"):
        apply_activation_layers_(loaded, layers, "test")
    assert not sparse_input_layers(loaded)
