"""A checkpoint with int8 weight layers AND an activation-sparsity section, end to end.

prune -> int8 (``quantize_``) -> TEAL thresholds -> ``save_pretrained`` -> ``sparseforge.load``: the
packed layers stay int8 (1 byte per kept weight plus row scales), the thresholds are restored, and
the loaded model computes what the saved one did; a dense load and a re-save keep both; the same
through ``sparseforge prune --quantize int8 --activation-sparsity``.
"""

from __future__ import annotations

import pytest
import torch

import sparseforge
from sparseforge.activation import (ActivationSparsityConfig, ColumnSparseLinear, SparseInputLinear, column_sparse_,
                                    sparse_input_layers, sparsify_activations_)
from sparseforge.config import CalibrationConfig, SparsifyConfig
from sparseforge.io.checkpoint import save_pretrained
from sparseforge.io.layout import load_state_dict_compressed, read_sparsity_config
from sparseforge.io.loading import load
from sparseforge.quant import SCALE_BUFFER, QuantConfig, quantize_
from tiny_models import tiny_model, tokens

PRUNE = {"method": "magnitude", "sparsity": 0.5}


def _pruned_int8_teal():
    model = tiny_model("llama")
    sparseforge.sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.5), progress=False)
    quantize_(model, QuantConfig(bits=8))
    scales = {n.removesuffix("." + SCALE_BUFFER): b.clone() for n, b in model.named_buffers() if n.endswith(SCALE_BUFFER)}
    sparsify_activations_(model, ActivationSparsityConfig(sparsity=0.5, calibration=CalibrationConfig(batch_size=4)),
                          calibration=tokens(4, 16), progress=False)
    return model.eval(), scales


def _logits(model, batch=2, seqlen=12):
    with torch.no_grad():
        return model(input_ids=tokens(batch, seqlen, seed=7)).logits


def _check_int8_checkpoint(out, scales):
    block = read_sparsity_config(out)
    int8 = {n.removesuffix(".weight") for n, e in block["layers"].items() if e["dtype"] == "int8"}
    assert int8 == set(scales) and len(int8) == 14  # every pruned projection stored int8
    section = block["activation"]["layers"]
    assert set(section) == set(scales)
    stored = load_state_dict_compressed(out)
    for name, scale in scales.items():
        fmt = stored[name + ".weight"]
        assert fmt.values.dtype == torch.int8 and torch.equal(fmt.scales, scale), name
    return section


def test_pruned_int8_teal_model_round_trips_through_load(tmp_path):
    model, scales = _pruned_int8_teal()
    layers = sparse_input_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():  # the quantization scale travels with the sparse-input layer
        assert torch.equal(getattr(layer, SCALE_BUFFER), scales[name]), name
    out = save_pretrained(model, tmp_path / "c", sparsity_config=PRUNE)
    section = _check_int8_checkpoint(out, scales)

    dense = load(out)  # dense kind: SparseInputLinear over the dequantized weights, the scales kept
    restored = sparse_input_layers(dense)
    assert set(restored) == set(layers)
    for name, layer in restored.items():
        assert type(layer) is SparseInputLinear and torch.equal(layer.weight_t, layers[name].weight_t), name
        assert torch.equal(layer.threshold, layers[name].threshold), name
        assert section[name]["threshold"] == pytest.approx(layers[name].threshold.item())
        assert torch.equal(getattr(layer, SCALE_BUFFER), scales[name]), name
    for shape in ((2, 12), (1, 1)):
        assert torch.equal(_logits(dense, *shape), _logits(model, *shape)), shape

    sparse = load(out, sparse=True)  # int8 column layers: 1 byte per kept weight, the same row scales
    columns = sparse_input_layers(sparse)
    assert set(columns) == set(layers)
    for name, layer in columns.items():
        assert isinstance(layer, ColumnSparseLinear) and layer.values.dtype == torch.int8, name
        assert torch.equal(layer.scales, scales[name]) and torch.equal(layer.threshold, layers[name].threshold), name
        assert torch.equal(layer.weight_t, layers[name].weight_t), name  # q * scale: the saved weights exactly
    for shape in ((2, 12), (1, 1)):  # the int8 kernel sums in another order than the dense GEMM
        torch.testing.assert_close(_logits(sparse, *shape), _logits(model, *shape), rtol=1e-4, atol=1e-4)

    # re-saving either loaded model writes the same int8 layers and thresholds
    for i, again in enumerate((dense, sparse)):
        copy_out = save_pretrained(again, tmp_path / f"again{i}", sparsity_config=PRUNE)
        assert read_sparsity_config(copy_out)["activation"] == read_sparsity_config(out)["activation"]
        _check_int8_checkpoint(copy_out, scales)


def test_column_sparse_of_an_int8_sparse_input_layer_keeps_int8(tmp_path):
    model, scales = _pruned_int8_teal()
    expected = _logits(model)
    column_sparse_(model, min_weight_sparsity=0.4)
    layers = sparse_input_layers(model)
    for name, layer in layers.items():
        assert isinstance(layer, ColumnSparseLinear) and layer.values.dtype == torch.int8, name
        assert torch.equal(layer.scales, scales[name]), name
    torch.testing.assert_close(_logits(model), expected, rtol=1e-4, atol=1e-4)
    out = save_pretrained(model, tmp_path / "c", sparsity_config=PRUNE)
    _check_int8_checkpoint(out, scales)


@pytest.mark.slow
def test_cli_prune_int8_with_activation_sparsity_loads_back(tmp_path, capsys):
    from sparseforge.cli import main

    out = tmp_path / "p"
    assert main(["prune", "builtin", "--method", "magnitude", "--sparsity", "0.5", "--quantize", "int8",
                 "--samples", "4", "--seqlen", "32", "--no-eval", "--no-progress", "--activation-sparsity", "0.4",
                 "--out", str(out)]) == 0
    assert "TEAL uniform activation sparsity 40%" in capsys.readouterr().out
    block = read_sparsity_config(out)
    assert block["layers"] and all(e["dtype"] == "int8" for e in block["layers"].values())
    assert set(block["activation"]["layers"]) == {n.removesuffix(".weight") for n in block["layers"]}
    dense, sparse = load(out), load(out, sparse=True)
    assert len(sparse_input_layers(dense)) == len(block["layers"]) == 42
    assert all(isinstance(m, ColumnSparseLinear) and m.values.dtype == torch.int8
               for m in sparse_input_layers(sparse).values())
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-3, atol=1e-3)
    assert main(["inspect", str(out)]) == 0
    assert "activation sparsity: 42 layers" in capsys.readouterr().out
