"""Compressed checkpoints with int8 values (format_version 4): layout, round trips, refusals, golden files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import transformers  # noqa: F401  (test dependency: missing means failure)

from tiny_models import tiny_model  # noqa: E402

from sparseforge.errors import ConfigError, ModelError  # noqa: E402
from sparseforge.formats import BitmapWeight, NMWeight  # noqa: E402
from sparseforge.io import validation  # noqa: E402
from sparseforge.io.checkpoint import save_pretrained  # noqa: E402
from sparseforge.io.layout import checkpoint_sizes, load_state_dict_compressed, read_safetensors_header, read_sparsity_config  # noqa: E402
from sparseforge.io.loading import load, load_sparse  # noqa: E402
from sparseforge.io.validation import FORMAT_VERSION, INT8_VERSION  # noqa: E402
from sparseforge.layers import linear_layers, weight_2d  # noqa: E402
from sparseforge.masks import mask_from_scores  # noqa: E402
from sparseforge.nn import SparseLinear  # noqa: E402

GOLDEN = Path(__file__).parents[1] / "golden"


def prune_and_quantize(model, pattern: str, sparsity):
    """Magnitude-prune every linear but lm_head, then quantize it as sparseforge.quant leaves it:
    weight = q * scale (float32) and a float32 ``weight_scale`` buffer (out,), 0 for a row pruned
    entirely. Returns the targets."""
    modules = dict(model.named_modules())
    targets = []
    with torch.no_grad():
        for name in linear_layers(model):
            if name == "lm_head":
                continue
            mod = modules[name]
            w = weight_2d(mod)  # (out, in) view
            w.copy_(torch.where(mask_from_scores(w.abs(), pattern, sparsity), w, torch.zeros(())))
            scale = w.abs().amax(dim=1) / 127  # 0 for a row pruned entirely
            w.copy_(torch.where(scale[:, None] > 0, torch.round(w / scale[:, None]) * scale[:, None], 0.0))
            mod.register_buffer("weight_scale", scale.clone())
            targets.append(f"{name}.weight")
    return targets


def info(pattern, sparsity, targets=None):
    return {"method": "magnitude", "pattern": pattern, "sparsity": sparsity, "targets": targets, "ignore": []}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pattern,sparsity,fmt,cls", [("2:4", None, "nm", NMWeight), ("unstructured", 0.6, "bitmap", BitmapWeight),
                                                     ("unstructured", 0.9, "bitmap", BitmapWeight)])
def test_int8_round_trip(tmp_path, family, pattern, sparsity, fmt, cls):
    model = tiny_model(family)
    targets = prune_and_quantize(model, pattern, sparsity)
    x = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        want = model(x).logits
    out = save_pretrained(model, tmp_path / "q", sparsity_config=info(pattern, sparsity))
    block = read_sparsity_config(out)
    assert block["format_version"] == FORMAT_VERSION == 4 and sorted(block["layers"]) == sorted(targets)
    header = read_safetensors_header(out / "model.safetensors")
    assert not any(k.endswith("weight_scale") for k in header)
    modules = dict(model.named_modules())
    packed = load_state_dict_compressed(out)
    prefix = "nm_" if fmt == "nm" else ""
    for name, layer in block["layers"].items():
        assert layer["format"] == fmt and layer["dtype"] == "int8"
        assert header[f"{name}.{prefix}values"]["dtype"] == "I8"
        assert header[f"{name}.{prefix}scales"] == {**header[f"{name}.{prefix}scales"], "dtype": "F32", "shape": layer["shape"][:1]}
        obj = packed[name]
        assert isinstance(obj, cls) and obj.values.dtype == torch.int8
        owner = modules[name.rsplit(".", 1)[0]]
        given = owner.weight_scale
        assert torch.equal(obj.scales, torch.where(given > 0, given, 1.0))  # all-pruned rows: scale 1.0
        w = owner.weight.detach()
        assert torch.equal(obj.to_dense(), w.t() if layer["transposed"] else w)
    dense = load(out)  # dequantized float32 weights, no weight_scale buffers
    assert dense.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(dense(x).logits, want, rtol=0, atol=0)
    sparse = load_sparse(out)
    layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == len(targets) and all(m.weight_format.dtype == torch.int8 for m in layers)
    # load_sparse's rule runs bitmaps of >= 85% sparsity as CSR, int8 values and scales shared
    assert {m.format for m in layers} == {"csr" if (sparsity or 0) >= 0.85 else fmt}
    with torch.no_grad():
        torch.testing.assert_close(sparse(x).logits, want, rtol=1e-4, atol=1e-4)
    from sparseforge.io.inspection import inspect_path

    report = {r["name"]: r for r in inspect_path(out)["layers"]}
    assert all(report[n]["dtype"] == "int8" and report[n]["format"] == fmt for n in targets)
    sizes = checkpoint_sizes(out)
    assert sizes["stored_bytes"] < sizes["dense_bytes"]


def _saved(tmp_path, name="q"):
    model = tiny_model("llama")
    prune_and_quantize(model, "2:4", None)
    return save_pretrained(model, tmp_path / name, sparsity_config=info("2:4", None))


def _edit_config(out, fn):
    config = json.loads((out / "config.json").read_text())
    fn(config["sparsity_config"])
    (out / "config.json").write_text(json.dumps(config))


def test_older_reader_and_older_version_refuse(tmp_path, monkeypatch):
    out = _saved(tmp_path)
    monkeypatch.setattr(validation, "FORMAT_VERSION", INT8_VERSION - 1)  # a sparseforge that reads up to 3
    with pytest.raises(ModelError, match=r"format_version 4; this sparseforge reads up to 3: upgrade sparseforge"):
        load(out)
    monkeypatch.undo()
    _edit_config(out, lambda b: b.update(format_version=3))
    with pytest.raises(ModelError, match="int8 values are stored from format_version 4 on.*format_version 3"):
        load(out)


def test_corrupt_scales_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from sparseforge.io.validation import tensor_checksums

    out = _saved(tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = load_file(str(out / "model.safetensors"))
    tensors[f"{name}.nm_scales"][3] = 0.0
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "sparseforge_format_version": "4"})
    _edit_config(out, lambda b: b.update(checksums=tensor_checksums(tensors)))
    with pytest.raises(ModelError, match=r"nm_scales.*|scales\[3\] = 0.0 must be finite and > 0"):
        load_sparse(out)
    del tensors[f"{name}.nm_scales"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "sparseforge_format_version": "4"})
    _edit_config(out, lambda b: b.update(checksums=tensor_checksums(tensors)))
    with pytest.raises(ModelError, match="needs tensor 'model.layers.0.mlp.up_proj.weight.nm_scales'"):
        load(out)


def test_int8_dtype_on_a_format_without_int8_is_refused(tmp_path):
    out = _saved(tmp_path)
    _edit_config(out, lambda b: b["layers"]["model.layers.0.mlp.up_proj.weight"].update(format="fanin"))
    with pytest.raises(ModelError, match="int8 values are stored only by the bitmap, nm formats, not fanin"):
        load(out)


def test_save_errors_write_nothing(tmp_path):
    model = tiny_model("llama")
    prune_and_quantize(model, "2:4", None)
    up = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        up.weight[0, int(torch.nonzero(up.weight[0])[0, 0])] += up.weight_scale[0] * 0.4  # off the grid
    with pytest.raises(ConfigError, match="layer model.layers.0.mlp.up_proj.weight: weight .* not on its row's int8 grid"):
        save_pretrained(model, tmp_path / "bad", sparsity_config=info("2:4", None))
    assert not (tmp_path / "bad").exists() and not list(tmp_path.iterdir())
    model = tiny_model("llama")
    prune_and_quantize(model, "2:4", None)
    targets = ["model.layers.0.mlp.up_proj.weight"]  # the other quantized layers are left out
    with pytest.raises(ConfigError, match="weight_scale belongs to a quantized layer whose weight is not compressed"):
        save_pretrained(model, tmp_path / "bad2", sparsity_config=info("2:4", None, targets))
    assert not list(tmp_path.iterdir())


def test_doc_example_bytes():
    """The worked example of docs/checkpoint-format.md (int8 values)."""
    w = torch.tensor([[0.0, 0.5, 0.0, -1.0, 0.25, 0.0, 0.0, 0.0]])
    nw = NMWeight.from_dense(w, "2:4", values_dtype=torch.int8)
    assert nw.scales.view(torch.uint8).tolist() == [0x04, 0x02, 0x01, 0x3C]
    assert nw.values.view(torch.uint8).tolist() == [[0x40, 0x81, 0x20, 0x00]]
    assert nw.indices.tolist() == [[0x4D]]


def test_golden_int8_files_hold_int8():
    """The v4 golden checkpoints (loaded bit-exactly by tests/io/test_checkpoint.py::test_golden) hold
    int8 values with their scales."""
    for name, fmt in (("v4-llama-2of4-int8", "nm"), ("v4-gpt2-unstructured-int8", "bitmap")):
        block = read_sparsity_config(GOLDEN / name)
        assert block["format_version"] == 4
        assert {(v["format"], v["dtype"]) for v in block["layers"].values()} == {(fmt, "int8")}
