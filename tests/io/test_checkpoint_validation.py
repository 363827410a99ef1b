"""Damaged or inconsistent checkpoints: both loaders and ``inspect`` refuse them alike, at load,
with a ModelError naming the file, the tensor and what is wrong (issue 12, items 3, 4 and 7)."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoint_corruption import block, copy_checkpoint, edit_config, save_pruned, split_file, write_file

import sparseforge
from sparseforge.io.loading import load
from sparseforge.errors import ModelError
from sparseforge.io.inspection import inspect_path

READERS = {
    "load": lambda p: load(p),
    "load_sparse": lambda p: load(p, sparse=True),
    "inspect": lambda p: inspect_path(p),
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    return {
        "bitmap": save_pruned(root / "bitmap", "llama", "unstructured", 0.5),
        "nm": save_pruned(root / "nm", "llama", "2:4", None),
        "gpt2": save_pruned(root / "gpt2", "gpt2", "unstructured", 0.5),
    }


@pytest.fixture
def ckpt(originals, tmp_path):
    return lambda kind="bitmap": copy_checkpoint(originals[kind], tmp_path / kind)


def refused_by_all(path, *fragments):
    """Every reader raises ModelError and each message holds every fragment."""
    for name, read in READERS.items():
        with pytest.raises(ModelError) as err:
            read(path)
        message = str(err.value)
        assert "\n" not in message, (name, message)
        for fragment in fragments:
            assert str(fragment) in message, (name, message)


UP = "model.layers.0.mlp.up_proj.weight"  # 64 x 32
Q = "model.layers.0.self_attn.q_proj.weight"  # 32 x 32, square


# ---- item 3: silent wrong results ---------------------------------------------------------------


def test_transposed_on_a_square_linear_layer_is_refused(ckpt):
    out = ckpt()
    edit_config(out, lambda c: c["sparsity_config"]["layers"][Q].update(transposed=True))
    refused_by_all(out, Q, "transposed")


def test_transposed_missing_on_a_conv1d_layer_is_refused(ckpt):
    out = ckpt("gpt2")
    name = next(n for n, v in block(out)["layers"].items() if v["transposed"])
    edit_config(out, lambda c: c["sparsity_config"]["layers"][name].update(transposed=False))
    refused_by_all(out, name, "transposed")


def _moved_bit(out, name):
    """Move one kept bit of ``name``'s bitmap from row 0 to row 1 (popcount and values unchanged)."""
    file = out / "model.safetensors"
    header, data = split_file(file)
    begin, end = header[f"{name}.bitmap"]["data_offsets"]
    cols_bytes = header[f"{name}.bitmap"]["shape"][1]
    bits = bytearray(data[begin:end])
    row0, row1 = bits[:cols_bytes], bits[cols_bytes:2 * cols_bytes]
    for k in range(cols_bytes):
        for j in range(8):
            if row0[k] >> j & 1 and not row1[k] >> j & 1:
                bits[k] &= ~(1 << j) & 0xFF
                bits[cols_bytes + k] |= 1 << j
                data = data[:begin] + bytes(bits) + data[end:]
                write_file(file, header, data)
                return
    raise AssertionError("no movable bit")


def test_a_bitmap_bit_moved_between_rows_fails_its_checksum(ckpt):
    out = ckpt()
    _moved_bit(out, UP)
    refused_by_all(out, "model.safetensors", f"{UP}.bitmap", "checksum")


@pytest.mark.parametrize("value", ["99", "3", 3.0, True, None, [3]])
def test_format_version_must_be_an_integer(ckpt, value):
    out = ckpt()
    edit_config(out, lambda c: c["sparsity_config"].update(format_version=value))
    refused_by_all(out, "config.json", "format_version")


def test_checksums_are_required_from_version_3(ckpt):
    out = ckpt()
    edit_config(out, lambda c: c["sparsity_config"].pop("checksums"))
    refused_by_all(out, "config.json", "checksums")


def test_a_flipped_value_bit_fails_its_checksum(ckpt):
    out = ckpt("nm")
    file = out / "model.safetensors"
    header, data = split_file(file)
    begin, _ = header[f"{UP}.nm_values"]["data_offsets"]
    data = bytearray(data)
    data[begin + 1] ^= 0x10
    write_file(file, header, bytes(data))
    refused_by_all(out, f"{UP}.nm_values", "checksum")


def test_a_dense_tensor_bit_flip_fails_its_checksum(ckpt):
    out = ckpt()
    file = out / "model.safetensors"
    header, data = split_file(file)
    begin, _ = header["model.embed_tokens.weight"]["data_offsets"]
    data = bytearray(data)
    data[begin] ^= 1
    write_file(file, header, bytes(data))
    refused_by_all(out, "model.embed_tokens.weight", "checksum")


# ---- item 4: safetensors-level corruption -------------------------------------------------------


def _damage(out, how):
    file = out / "model.safetensors"
    header, data = split_file(file)
    raw = file.read_bytes()
    first = next(n for n in header if n != "__metadata__")
    if how == "truncated":
        file.write_bytes(raw[: len(raw) - 100])
    elif how == "truncated_in_length":
        file.write_bytes(raw[:5])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "offsets_past_end":
        header[first]["data_offsets"][1] += 10**6
        write_file(file, header, data)
    elif how == "header_100MiB":
        write_file(file, header, data, declared=100 << 20)
    elif how == "header_2^62":
        write_file(file, header, data, declared=2**62)
    elif how == "bogus_dtype":
        header[first]["dtype"] = "Q7"
        write_file(file, header, data)
    elif how == "negative_shape":
        header[first]["shape"] = [-1, *header[first]["shape"][1:]]
        write_file(file, header, data)
    elif how == "huge_shape":
        header[first]["shape"] = [2**62, 2**62]
        write_file(file, header, data)
    elif how == "not_utf8":
        text = json.dumps(header).encode()
        write_file(file, text[:10] + b"\xff\xfe" + text[12:], data)
    elif how == "not_json":
        write_file(file, b"{" + b"x" * 30 + b"}", data)
    elif how == "deep_json":
        write_file(file, b"[" * 100000 + b"]" * 100000, data)
    elif how == "not_an_object":
        write_file(file, b"[1, 2]", data)
    elif how == "overlap":
        second = [n for n in header if n != "__metadata__"][1]
        header[second]["data_offsets"] = header[first]["data_offsets"]
        write_file(file, header, data)
    return file


DAMAGE = ["truncated", "truncated_in_length", "empty", "offsets_past_end", "header_100MiB", "header_2^62",
          "bogus_dtype", "negative_shape", "huge_shape", "not_utf8", "not_json", "deep_json", "not_an_object",
          "overlap"]


@pytest.mark.parametrize("how", DAMAGE)
def test_safetensors_corruption_is_a_model_error_naming_the_file(ckpt, how):
    out = ckpt()
    file = _damage(out, how)
    refused_by_all(out, file)


@pytest.mark.parametrize("how", ["bogus_dtype", "negative_shape", "offsets_past_end"])
def test_the_damaged_tensor_is_named(ckpt, how):
    out = ckpt()
    header, _ = split_file(out / "model.safetensors")
    first = next(n for n in header if n != "__metadata__")
    _damage(out, how)
    refused_by_all(out, first)


def test_corrupt_dense_checkpoints_are_model_errors_too(tmp_path):
    from tiny_models import tiny_model

    out = sparseforge.save_pretrained(tiny_model("llama"), tmp_path / "d", compressed=False)
    _damage(out, "truncated")
    for read in (READERS["load"], READERS["inspect"]):
        with pytest.raises(ModelError, match="model.safetensors"):
            read(out)


CONFIG_EDITS = {
    "shape_1d": (lambda b: b["layers"][UP].update(shape=[768]), "shape"),
    "shape_strings": (lambda b: b["layers"][UP].update(shape=["a", "b"]), "shape"),
    "shape_wrong": (lambda b: b["layers"][UP].update(shape=[32, 64]), "shape"),
    "tied_missing": (lambda b: b.update(tied={"lm_head.weight": "model.nothing.weight"}), "model.nothing.weight"),
    "tied_not_a_dict": (lambda b: b.update(tied=["lm_head.weight"]), "tied"),
    "layers_list": (lambda b: b.update(layers=list(b["layers"])), "layers"),
    "layer_not_a_dict": (lambda b: b["layers"].update({UP: "bitmap"}), UP),
    "dtype_bogus": (lambda b: b["layers"][UP].update(dtype="float99"), "dtype"),
    "transposed_string": (lambda b: b["layers"][UP].update(transposed="no"), "transposed"),
    "nnz_negative": (lambda b: b["layers"][UP].update(nnz=-5), "nnz"),
    "pattern_bogus": (lambda b: b["layers"][UP].update(format="nm", pattern="banana"), "pattern"),
    "format_unknown": (lambda b: b["layers"][UP].update(format="csr9"), "csr9"),
    "block_pattern_bogus": (lambda b: b.update(pattern="nm"), "pattern"),  # found by the fuzz suite
    "block_not_a_dict": (None, "sparsity_config"),
}


@pytest.mark.parametrize("edit", list(CONFIG_EDITS))
def test_malformed_config_fields_are_model_errors(ckpt, edit):
    out = ckpt()
    fn, fragment = CONFIG_EDITS[edit]
    if fn is None:
        edit_config(out, lambda c: c.update(sparsity_config=["bitmap"]))
    else:
        edit_config(out, lambda c: fn(c["sparsity_config"]))
    refused_by_all(out, "config.json", fragment)


@pytest.mark.parametrize("arch", [["__class__"], ["LlamaConfig"], ["os"], [], "LlamaForCausalLM", [7]])
def test_architectures_must_name_a_model_class(ckpt, arch):
    out = ckpt()
    edit_config(out, lambda c: c.update(architectures=arch))
    refused_by_all(out, "architectures" if not arch or not isinstance(arch, list) or arch == [7] else "architecture")


def test_a_shape_mismatch_with_the_model_fails_at_load_not_at_forward(ckpt):
    out = ckpt()
    edit_config(out, lambda c: c.update(intermediate_size=48))  # the model now expects up_proj (48, 32)
    refused_by_all(out, "config.json", "mlp", "48")


def test_unreadable_config_json(ckpt):
    out = ckpt()
    (out / "config.json").write_bytes(b"\xff\xfe{not json")
    refused_by_all(out, "config.json")


# ---- item 7: inspect runs the same validation ---------------------------------------------------


def _retensor(out, fn):
    """Apply ``fn(tensors)`` to the stored tensors and rewrite the file (checksums updated, so only
    the inconsistency under test remains)."""
    from safetensors.torch import load_file, save_file

    from sparseforge.io.validation import tensor_checksums

    file = out / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    edit_config(out, lambda c: c["sparsity_config"].update(checksums=tensor_checksums(tensors)))


def test_a_missing_tensor(ckpt):
    out = ckpt()
    _retensor(out, lambda t: t.pop("model.norm.weight"))
    refused_by_all(out, "model.norm.weight")


def test_a_missing_packed_buffer(ckpt):
    out = ckpt()
    _retensor(out, lambda t: t.pop(f"{UP}.values"))
    refused_by_all(out, f"{UP}.values")


def test_an_extra_tensor(ckpt):
    out = ckpt()
    _retensor(out, lambda t: t.update({"model.surprise": torch.zeros(3)}))
    refused_by_all(out, "model.surprise")


def test_a_dense_tensor_with_the_wrong_shape(ckpt):
    out = ckpt()
    _retensor(out, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    refused_by_all(out, "model.norm.weight", "31")


def test_a_tie_dropped_from_the_config(ckpt):
    """Found by the fuzz suite: without ``tied``, load re-tied lm_head while load(sparse=True) refused."""
    out = ckpt("gpt2")
    edit_config(out, lambda c: c["sparsity_config"].pop("tied"))
    refused_by_all(out, "lm_head.weight")


def test_layers_emptied(ckpt):
    out = ckpt()
    edit_config(out, lambda c: c["sparsity_config"].update(layers={}))
    refused_by_all(out, ".bitmap", "not a parameter")


def test_a_sound_checkpoint_passes_all_three_alike(ckpt):
    for kind in ("bitmap", "nm", "gpt2"):
        out = ckpt(kind)
        report = inspect_path(out)
        assert report["totals"]["pattern_ok"] is True
        dense, sparse = load(out), load(out, sparse=True)
        x = torch.randint(0, 96, (1, 8))
        torch.testing.assert_close(dense(x).logits, sparse(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("how", ["truncated", "not_json", "header_2^62"])
def test_cli_inspect_prints_one_line_and_exits_2(ckpt, capsys, how):
    from sparseforge.cli import main

    out = ckpt()
    file = _damage(out, how)
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparseforge inspect: error:") and str(file) in err and len(err.splitlines()) == 1
