"""inspect_path / format_report on compressed, dense-sparseforge and plain checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import transformers  # noqa: F401  (test dependency: missing means failure)

from test_checkpoint import info, prune  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from sparseforge.errors import ModelError  # noqa: E402
from sparseforge.io.checkpoint import save_pretrained  # noqa: E402
from sparseforge.io.inspection import format_report, inspect_path  # noqa: E402
from sparseforge.io.layout import checkpoint_sizes, load_state_dict_compressed  # noqa: E402


def by_name(report):
    return {r["name"]: r for r in report["layers"]}


def test_compressed_nm_report(tmp_path):
    model = tiny_model("gpt2")
    pruned = prune(model, "2:4", None)
    out = save_pretrained(model, tmp_path / "c", sparsity_config=info("2:4", None))
    report = inspect_path(out)
    assert report["format"] == "nm" and report["compressed"] and report["pattern"] == "2:4"
    rows = by_name(report)
    assert "lm_head.weight" not in rows  # tied alias listed once, under its canonical name
    state = model.state_dict()
    packed = load_state_dict_compressed(out)
    for name, t in state.items():
        if name == "lm_head.weight":
            continue
        r = rows[name]
        assert r["shape"] == list(t.shape) and r["nnz"] == int((t != 0).sum()) and r["numel"] == t.numel()
        assert r["dense_bytes"] == t.numel() * 4
        if name in pruned:
            assert r["format"] == "nm" and r["sparsity"] == 0.5 and r["pattern_ok"] is True
            assert r["bytes"] == packed[name].nbytes
        else:
            assert r["format"] == "dense" and r["pattern_ok"] is None and r["bytes"] == t.numel() * 4
    totals = report["totals"]
    assert totals["pattern_ok"] is True
    assert totals["bytes"] == sum(r["bytes"] for r in report["layers"])
    assert totals["ratio"] == pytest.approx(totals["bytes"] / totals["dense_bytes"]) and totals["ratio"] < 0.8
    assert totals["file_bytes"] == checkpoint_sizes(out)["file_bytes"]
    text = format_report(report)
    assert "transformer.h.0.mlp.c_fc.weight" in text and "VIOLATED" not in text and "ratio" in text
    assert text.index("transformer.h.0.") < text.index("transformer.h.1.")


@pytest.mark.parametrize("pattern,fmt", [("fanin", "fanin"), ("block4x4", "bsr")])
def test_fanin_and_bsr_report(tmp_path, pattern, fmt):
    from test_checkpoint import sparsified

    model, sc = sparsified(pattern, torch.float32)
    out = save_pretrained(model, tmp_path / "c", sparsity_config=sc)
    report = inspect_path(out)
    assert report["format"] == fmt and report["compressed"] and report["pattern"] == pattern
    rows = by_name(report)
    packed = load_state_dict_compressed(out)
    state = model.state_dict()
    for name in sc["targets"]:
        r = rows[name]
        assert r["format"] == fmt and r["pattern_ok"] is True and r["sparsity"] == 0.5
        assert r["nnz"] == int((state[name] != 0).sum()) and r["bytes"] == packed[name].nbytes
    assert report["totals"]["pattern_ok"] is True
    assert f" {fmt} " in format_report(report)


def test_violation_is_reported(tmp_path):
    model = tiny_model("llama")
    prune(model, "2:4", None)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4:8] = 1.0
    report = inspect_path(save_pretrained(model, tmp_path / "c", sparsity_config=info("2:4", None)))
    row = by_name(report)["model.layers.1.mlp.up_proj.weight"]
    assert row["format"] == "bitmap" and row["pattern_ok"] is False
    assert report["totals"]["pattern_ok"] is False
    assert "VIOLATED" in format_report(report)


def test_plain_gpt2_checkpoint_uses_out_in_orientation(tmp_path):
    model = tiny_model("gpt2")
    pruned = prune(model, "2:4", None)
    model.save_pretrained(tmp_path / "plain")  # no sparsity block; Conv1D weights stored (in, out)
    report = inspect_path(tmp_path / "plain", pattern="2:4")
    assert report["format"] == "dense" and not report["compressed"] and report["notes"] == []
    rows = by_name(report)
    assert all(rows[n]["pattern_ok"] is True for n in pruned)
    assert rows["transformer.wte.weight"]["pattern_ok"] is None  # not a linear layer
    assert report["totals"]["ratio"] == 1.0
    assert inspect_path(tmp_path / "plain")["totals"]["pattern_ok"] is None  # no pattern, nothing checked


def test_skeleton_failure_is_noted(tmp_path):
    model = tiny_model("llama")
    prune(model, "2:4", None)
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["architectures"] = ["NoSuchModel"]
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    report = inspect_path(tmp_path / "plain", pattern="2:4")
    assert report["notes"] and "last dimension" in report["notes"][0]
    assert by_name(report)["model.layers.0.mlp.up_proj.weight"]["pattern_ok"] is True  # (out, in) as stored
    assert "note:" in format_report(report)


def test_dense_sparseforge_checkpoint(tmp_path):
    model = tiny_model("llama")
    pruned = prune(model, "unstructured", 0.5)
    out = save_pretrained(model, tmp_path / "d", compressed=False, sparsity_config=info("unstructured", 0.5, pruned))
    report = inspect_path(out)
    assert report["format"] == "dense" and report["pattern"] == "unstructured"
    rows = by_name(report)
    assert all(rows[n]["pattern_ok"] is True and rows[n]["sparsity"] == 0.5 for n in pruned)


def test_non_model_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        inspect_path(tmp_path / "nope")
    with pytest.raises(ModelError, match="not a model directory"):
        inspect_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="safetensors"):
        inspect_path(tmp_path)
