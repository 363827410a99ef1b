"""Saving and restoring activation-sparsity thresholds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sparseforge.activation import (
    ActivationSparsityConfig,
    SparseInputLinear,
    load_activation_sparsity_,
    save_activation_sparsity,
    sparse_input_layers,
    sparsify_activations_,
)
from sparseforge.activation.cats import CATSMLP
from sparseforge.config import CalibrationConfig
from sparseforge.errors import ConfigError, ModelError
from tiny_models import VOCAB, tiny_model


def _calib():
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_round_trip_restores_the_same_model(tmp_path, method):
    model = tiny_model("llama").eval()
    sparsify_activations_(model, ActivationSparsityConfig(method=method, sparsity=0.5, calibration=CalibrationConfig(batch_size=4)),
                          calibration=_calib(), progress=False)
    path = save_activation_sparsity(model, tmp_path)
    assert path.name == "activation_sparsity.json" and not list(tmp_path.glob(".*.tmp"))
    fresh = tiny_model("llama").eval()  # same seed: the dense weights of the original
    load_activation_sparsity_(fresh, path)
    ids = _calib()[:2, :8]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    kinds = {e["kind"] for e in json.loads(path.read_text())["layers"].values()}
    assert kinds == ({"linear"} if method == "teal" else {"cats"})
    if method == "cats":
        assert sum(isinstance(m, CATSMLP) for m in fresh.modules()) == 2


def test_infinite_and_per_channel_thresholds_survive(tmp_path):
    model = nn.Sequential(SparseInputLinear.from_linear(nn.Linear(3, 2), threshold=math.inf),
                          SparseInputLinear.from_linear(nn.Linear(2, 2), threshold=torch.tensor([0.1, 0.2])))
    path = save_activation_sparsity(model, tmp_path / "t.json")
    fresh = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    load_activation_sparsity_(fresh, path)
    assert math.isinf(fresh[0].threshold.item())
    assert fresh[1].threshold.tolist() == pytest.approx([0.1, 0.2])


def test_mismatched_files_are_errors_and_change_nothing(tmp_path):
    model = nn.Sequential(SparseInputLinear.from_linear(nn.Linear(3, 2), threshold=0.5), nn.ReLU())
    path = save_activation_sparsity(model, tmp_path)
    other = nn.Sequential(nn.Linear(3, 2))
    data = json.loads(path.read_text())
    data["layers"]["1"] = {"kind": "linear", "threshold": 0.1}  # '1' is missing in `other`
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="no layer 1"):
        load_activation_sparsity_(other, path)
    assert isinstance(other[0], nn.Linear) and not isinstance(other[0], SparseInputLinear)  # nothing swapped
    with pytest.raises(ModelError, match="not a linear layer"):
        load_activation_sparsity_(nn.Sequential(nn.ReLU()), save_activation_sparsity(model, tmp_path / "a.json"))
    data = {"version": 1, "layers": {"0": {"kind": "linear", "threshold": [0.1, 0.2]}}}
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="3 input features but 2 thresholds"):
        load_activation_sparsity_(nn.Sequential(nn.Linear(3, 2)), tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"version": 9, "layers": {}}))
    with pytest.raises(ConfigError, match="version 1"):
        load_activation_sparsity_(other, tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"version": 1, "layers": {"0": {"kind": "linear", "threshold": -1}}}))
    with pytest.raises(ConfigError, match=">= 0"):
        load_activation_sparsity_(nn.Sequential(nn.Linear(3, 2)), tmp_path / "d.json")
    with pytest.raises(ModelError, match="sparsify_activations_"):
        save_activation_sparsity(nn.Sequential(nn.Linear(2, 2)), tmp_path)
    assert not sparse_input_layers(other)
