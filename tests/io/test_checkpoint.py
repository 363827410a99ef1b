"""Checkpoints: bit-exact round trips, sizes, tied weights, atomic writes, refusals, bad paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import transformers  # noqa: F401  (test dependency: missing means failure)
import safetensors  # noqa: F401  (test dependency: missing means failure)

from tiny_models import tiny_model  # noqa: E402

from sparseforge.errors import ConfigError, ModelError  # noqa: E402
from sparseforge.formats import BitmapWeight, NMWeight  # noqa: E402
from sparseforge.io import checkpoint, validation  # noqa: E402
from sparseforge.io.checkpoint import save_pretrained  # noqa: E402
from sparseforge.io.layout import checkpoint_sizes, load_state_dict_compressed, read_sparsity_config  # noqa: E402
from sparseforge.io.validation import FORMAT_VERSION  # noqa: E402
from sparseforge.io.loading import load  # noqa: E402
from sparseforge.layers import linear_layers, weight_2d  # noqa: E402
from sparseforge.masks import mask_from_scores  # noqa: E402


def prune(model, pattern: str, sparsity: float | None, zero: str = "where") -> list[str]:
    """Magnitude-prune every linear layer but lm_head; return the pruned parameter names."""
    modules = dict(model.named_modules())
    names = []
    for name in linear_layers(model):
        if name == "lm_head":
            continue
        w = weight_2d(modules[name])  # (out, in) view
        mask = mask_from_scores(w.abs().float(), pattern, sparsity)
        if zero == "where":
            w.copy_(torch.where(mask, w, torch.zeros((), dtype=w.dtype)))
        else:  # w * mask leaves -0.0 at pruned negatives
            w.mul_(mask)
        names.append(f"{name}.weight")
    return names


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_exact(a, b) -> None:
    """Every parameter and persistent buffer: same names, dtypes, shapes and bytes."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(raw(sa[k]), raw(sb[k])), k


def assert_buffers_equal(a, b) -> None:
    """All buffers, non-persistent ones (rotary inv_freq) included."""
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(raw(ba[k]), raw(bb[k])), k


def info(pattern, sparsity, targets=None):
    return {"method": "magnitude", "pattern": pattern, "sparsity": sparsity, "targets": targets, "ignore": []}


CASES = [
    ("llama", torch.float32), ("llama", torch.bfloat16), ("bert", torch.float32), ("gpt2", torch.float32),
    ("gpt2", torch.bfloat16),
]


@pytest.mark.parametrize("family,dtype", CASES)
@pytest.mark.parametrize("pattern,sparsity,fmt", [("unstructured", 0.5, "bitmap"), ("2:4", None, "nm")])
def test_round_trip_bit_exact(tmp_path, family, dtype, pattern, sparsity, fmt):
    model = tiny_model(family, dtype=dtype)
    pruned = prune(model, pattern, sparsity)
    out = save_pretrained(model, tmp_path / "c", sparsity_config=info(pattern, sparsity))
    block = read_sparsity_config(out)
    assert block["format_version"] == FORMAT_VERSION and block["format"] == fmt
    assert sorted(block["layers"]) == sorted(pruned)  # targets=None found exactly the pruned layers
    assert {v["format"] for v in block["layers"].values()} == {fmt}
    assert all(v["dtype"] == str(dtype)[6:] for v in block["layers"].values())
    loaded = load(out)
    assert type(loaded) is type(model) and loaded.dtype == dtype
    assert_bit_exact(model, loaded)
    # non-persistent buffers are not saved: they must match what plain transformers rebuilds
    # (e.g. fp32 rotary inv_freq in a bf16 Llama), and so must the outputs
    model.save_pretrained(tmp_path / "plain")
    reference = type(model).from_pretrained(tmp_path / "plain", dtype=dtype)
    assert_buffers_equal(reference, loaded)
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4]])
        a, b = reference(ids), loaded(ids)
        key = "logits" if "logits" in a else "last_hidden_state"
        assert torch.equal(a[key], b[key])


def test_gpt2_conv1d_transposed_and_tied(tmp_path):
    model = tiny_model("gpt2")
    prune(model, "2:4", None)
    out = save_pretrained(model, tmp_path / "c", sparsity_config=info("2:4", None))
    block = read_sparsity_config(out)
    assert block["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    layer = block["layers"]["transformer.h.0.mlp.c_fc.weight"]
    assert layer["transposed"] is True and layer["shape"] == [128, 32]  # (out, in); Conv1D stores (in, out)
    state = load_state_dict_compressed(out)
    obj = state["transformer.h.0.mlp.c_fc.weight"]
    assert isinstance(obj, NMWeight) and obj.shape == (128, 32)
    assert torch.equal(obj.to_dense().t(), model.transformer.h[0].mlp.c_fc.weight.detach())
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    loaded = load(out)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied


def test_tied_llama(tmp_path):
    import transformers as t

    cfg = t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = t.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prune(model, "unstructured", 0.5)
    loaded = load(save_pretrained(model, tmp_path / "c", sparsity_config=info("unstructured", 0.5)))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_bit_exact(model, loaded)


def test_compressed_smaller_than_dense(tmp_path):
    model = tiny_model("llama")
    prune(model, "2:4", None)
    c = save_pretrained(model, tmp_path / "c", sparsity_config=info("2:4", None))
    d = save_pretrained(model, tmp_path / "d", compressed=False, sparsity_config=info("2:4", None))
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(c) / size(d) < 0.8
    sizes = checkpoint_sizes(c)
    assert sizes["file_bytes"] == size(c)
    assert sizes["dense_bytes"] == checkpoint_sizes(d)["dense_bytes"] == checkpoint_sizes(d)["stored_bytes"]
    assert sizes["ratio"] < 0.8
    # N:M layers: values (rows, cols/2) fp32 + 2-bit indices (rows, cols/2 * 2 bits = cols/8 bytes)
    layer = read_sparsity_config(c)["layers"]["model.layers.0.mlp.down_proj.weight"]
    rows, cols = layer["shape"]
    assert load_state_dict_compressed(c)["model.layers.0.mlp.down_proj.weight"].nbytes == rows * cols // 2 * 4 + rows * cols // 8


def test_dense_checkpoint_loads_in_plain_transformers(tmp_path):
    import transformers as t

    model = tiny_model("llama")
    pruned = prune(model, "unstructured", 0.5)
    out = save_pretrained(model, tmp_path / "d", compressed=False, sparsity_config=info("unstructured", 0.5, pruned))
    block = read_sparsity_config(out)
    assert block["format"] == "dense" and block["targets"] == pruned
    plain = t.AutoModelForCausalLM.from_pretrained(out)
    assert_bit_exact(model, plain)
    assert_bit_exact(model, load(out))


def test_resave_keeps_block_and_dtype_override(tmp_path):
    model = tiny_model("llama")
    prune(model, "2:4", None)
    first = load(save_pretrained(model, tmp_path / "a", sparsity_config=info("2:4", None)))
    second = save_pretrained(first, tmp_path / "b")  # sparsity_config=None: reuses the loaded block
    assert read_sparsity_config(second)["pattern"] == "2:4" and read_sparsity_config(second)["format"] == "nm"
    assert_bit_exact(model, load(second))
    half = load(second, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(half.model.layers[0].mlp.up_proj.weight, w.to(torch.bfloat16))


def test_nm_pattern_falls_back_to_bitmap_per_layer(tmp_path):
    model = tiny_model("llama")
    prune(model, "2:4", None)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :4] = 1.0  # this layer now violates 2:4
    out = save_pretrained(model, tmp_path / "c", sparsity_config=info("2:4", None))
    layers = read_sparsity_config(out)["layers"]
    assert layers["model.layers.0.mlp.up_proj.weight"]["format"] == "bitmap"
    assert layers["model.layers.0.mlp.down_proj.weight"]["format"] == "nm"
    state = load_state_dict_compressed(out)
    assert isinstance(state["model.layers.0.mlp.up_proj.weight"], BitmapWeight)
    assert_bit_exact(model, load(out))


def test_negative_zero_is_canonicalised(tmp_path):
    """Documented: pruned entries load as +0.0, so ``w * mask`` pruning (-0.0) is equal but not bitwise."""
    model = tiny_model("llama")
    prune(model, "unstructured", 0.5, zero="mul")
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.signbit(w[w == 0]).any()
    loaded = load(save_pretrained(model, tmp_path / "c", sparsity_config=info("unstructured", 0.5)))
    w2 = loaded.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, w2)
    assert not torch.signbit(w2[w2 == 0]).any()


def test_explicit_targets_and_ignore(tmp_path):
    model = tiny_model("llama")
    pruned = prune(model, "unstructured", 0.5)
    out = save_pretrained(model, tmp_path / "a", sparsity_config=info("unstructured", 0.5, pruned[:2]))
    assert sorted(read_sparsity_config(out)["layers"]) == sorted(pruned[:2])
    assert read_sparsity_config(out)["targets"] == pruned[:2]
    assert_bit_exact(model, load(out))
    cfg = {**info("unstructured", 0.5), "ignore": ["*.mlp.*"]}
    layers = read_sparsity_config(save_pretrained(model, tmp_path / "b", sparsity_config=cfg))["layers"]
    assert layers and not any(".mlp." in n for n in layers)
    with pytest.raises(ConfigError, match="did you mean 'model.layers.0.mlp.up_proj.weight'"):
        save_pretrained(model, tmp_path / "c", sparsity_config=info("unstructured", 0.5, ["model.layers.0.mlp.up_proj"]))
    with pytest.raises(ConfigError, match="only 2-D"):
        save_pretrained(model, tmp_path / "c", sparsity_config=info("unstructured", 0.5, ["model.norm.weight"]))
    with pytest.raises(ConfigError, match="JSON"):
        save_pretrained(model, tmp_path / "c", sparsity_config={"pattern": "2:4", "x": torch.ones(1)})
    with pytest.raises(ConfigError, match="cannot parse"):
        save_pretrained(model, tmp_path / "c", sparsity_config={"pattern": "2/4"})
    assert not (tmp_path / "c").exists()


def test_tokenizer_saved(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    model = tiny_model("llama")
    out = save_pretrained(model, tmp_path / "c", tokenizer=tokenizer)
    assert (out / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [1, 2]


def test_overwrite_refusal_and_replace(tmp_path):
    model = tiny_model("llama")
    out = save_pretrained(model, tmp_path / "c")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="overwrite=True"):
        save_pretrained(model, out)
    assert (out / "model.safetensors").read_bytes() == before
    prune(model, "2:4", None)
    save_pretrained(model, out, overwrite=True, sparsity_config=info("2:4", None))
    assert read_sparsity_config(out)["format"] == "nm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp or old dirs left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "important.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a model directory"):
        save_pretrained(model, other, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        save_pretrained(model, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert read_sparsity_config(save_pretrained(model, tmp_path / "empty", sparsity_config=info("2:4", None)))


@pytest.mark.parametrize("compressed", [True, False])
def test_atomic_write_failure_mid_write(tmp_path, monkeypatch, compressed):
    model = tiny_model("llama")
    out = save_pretrained(model, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        assert args[0].parent == tmp_path and args[0].name.startswith(".")  # writing into a temp dir
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "_write_block", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, out, overwrite=True, compressed=compressed, sparsity_config={})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    with pytest.raises(RuntimeError):
        save_pretrained(model, tmp_path / "new", compressed=compressed, sparsity_config={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # a new out_dir is never created half-way


def test_atomic_write_failure_at_swap(tmp_path, monkeypatch):
    model = tiny_model("llama")
    out = save_pretrained(model, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".c.tmp-"):
            raise OSError("rename failed")
        return real_rename(src, dst)

    import sparseforge.io.atomic_dir

    monkeypatch.setattr(sparseforge.io.atomic_dir, "_exchange", lambda a, b: False)  # the two-rename path
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_pretrained(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old checkpoint moved back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_bad_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(ModelError, match="is not a model directory: it has no config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="is not a model directory: it has no weights"):
        load(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        checkpoint_sizes(tmp_path / "missing")
    with pytest.raises(ModelError, match="not a model directory"):
        load_state_dict_compressed(tmp_path)


def test_corrupt_or_future_checkpoints(tmp_path):
    model = tiny_model("llama")
    prune(model, "2:4", None)
    out = save_pretrained(model, tmp_path / "c", sparsity_config=info("2:4", None))
    config = json.loads((out / "config.json").read_text())
    config["sparsity_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="format_version 99.*upgrade sparseforge"):
        load(out)
    config["sparsity_config"]["format_version"] = 1
    config["sparsity_config"]["layers"]["model.layers.0.mlp.up_proj.weight"]["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="config.json says float16"):
        load(out)
    config["sparsity_config"]["layers"]["model.layers.0.mlp.up_proj.weight"]["format"] = "csr9"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="unknown format 'csr9'"):
        load(out)
    del config["sparsity_config"]["layers"]["model.layers.0.mlp.up_proj.weight"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="nm_indices' is not a parameter or buffer of LlamaForCausalLM"):
        load(out)  # its packed tensors are now unexpected and the weight missing
    config["architectures"] = ["NoSuchModel"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="NoSuchModel"):
        load(out)


def test_missing_transformers_message(tmp_path, monkeypatch):
    import builtins

    out = save_pretrained(tiny_model("llama"), tmp_path / "c")
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("no transformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModelError, match=r"pip install 'sparseforge\[hf\]'"):
        load(out)


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sparseforge.io.checkpoint, sparseforge.io.inspection, sparseforge.io.loading, sys; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


GOLDEN = Path(__file__).parents[1] / "golden"


@pytest.mark.parametrize("name", ["v1-llama-2of4-fp32", "v1-gpt2-unstructured-bf16", "v3-llama-2of4-fp32",
                                  "v3-gpt2-unstructured-bf16", "v4-llama-2of4-teal-fp32",
                                  "v4-llama-2of4-int8", "v4-gpt2-unstructured-int8"])
def test_golden(name):
    """Checkpoints written by an earlier sparseforge (tests/golden/make_golden.py) load bit-exactly."""
    import hashlib

    expected = json.loads((GOLDEN / "expected.json").read_text())[name]
    model = load(GOLDEN / name)
    assert type(model).__name__ == expected["class"] and str(model.dtype) == f"torch.{expected['dtype']}"
    state = model.state_dict()
    scales = {k: state.pop(k) for k in list(state) if k.endswith(".weight_scale")}  # int8 layers load quantized
    assert sorted(state) == sorted(expected["sha256"])
    packed_int8 = {k: v for k, v in load_state_dict_compressed(GOLDEN / name).items()
                   if getattr(v, "scales", None) is not None}
    assert sorted(scales) == sorted(k.removesuffix(".weight") + ".weight_scale" for k in packed_int8)
    for key, obj in packed_int8.items():
        assert torch.equal(scales[key.removesuffix(".weight") + ".weight_scale"], obj.scales), key
    for key, digest in expected["sha256"].items():
        assert hashlib.sha256(raw(state[key]).numpy().tobytes()).hexdigest() == digest, key
    thresholds = {n: m.threshold.tolist() for n, m in model.named_modules() if type(m).__name__ == "SparseInputLinear"}
    assert thresholds == expected.get("activation", {})  # v4: activation thresholds restored by load
    packed = load_state_dict_compressed(GOLDEN / name)
    assert {k: type(packed[k]).__name__ for k in expected["formats"]} == expected["formats"]
    first = packed[expected["first_target"]]
    for key, data in expected["first_target_buffers"].items():
        buf = first.state_dict()[key]
        assert (buf.tolist() if buf.dtype == torch.uint8 else buf.view(torch.uint8).flatten().tolist()) == data, key
    # today's writer produces the very same packed bytes from the loaded weights (int8: on their scales)
    for key in expected["formats"]:
        obj = packed[key]
        quant = {"values_dtype": torch.int8, "scales": obj.scales} if obj.values.dtype == torch.int8 else {}
        again = (type(obj).from_dense(obj.to_dense(), obj.pattern, **quant) if isinstance(obj, NMWeight)
                 else BitmapWeight.from_dense(obj.to_dense(), **quant))
        for k, v in obj.state_dict().items():
            assert torch.equal(raw(again.state_dict()[k]), raw(v)), (key, k)


# ---- fan-in and BSR layers (format_version 2) ------------------------------------------------------


def sparsified(pattern: str, dtype):
    """A tiny Llama pruned by sparsify_ (magnitude, 50 %) with ``pattern``, and its sparsity_config."""
    import sparseforge
    from sparseforge.config import SparsifyConfig

    model = tiny_model("llama", dtype=dtype)
    report = sparseforge.sparsify_(model, SparsifyConfig(method="magnitude", pattern=pattern, sparsity=0.5),
                                   progress=False)
    return model, report.sparsity_config()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern,fmt,cls", [("fanin", "fanin", "FanInWeight"), ("block4x4", "bsr", "BSRWeight")])
def test_fanin_and_bsr_round_trip_bit_exact(tmp_path, pattern, fmt, cls, dtype):
    from sparseforge.io.layout import read_safetensors_header

    model, sc = sparsified(pattern, dtype)
    out = save_pretrained(model, tmp_path / "c", sparsity_config=sc)
    block = read_sparsity_config(out)
    assert block["format_version"] == FORMAT_VERSION and block["format"] == fmt and block["pattern"] == pattern
    assert sorted(block["layers"]) == sorted(sc["targets"]) and len(block["layers"]) == 14
    header = read_safetensors_header(out / "model.safetensors")
    state = model.state_dict()
    packed = load_state_dict_compressed(out)
    for name, layer in block["layers"].items():
        w = state[name]  # (out, in)
        assert layer["format"] == fmt and layer["dtype"] == str(dtype)[6:] and layer["nnz"] == int((w != 0).sum())
        obj = packed[name]
        assert type(obj).__name__ == cls and torch.equal(raw(obj.to_dense()), raw(w))
        if fmt == "fanin":
            k = int((w[0] != 0).sum())
            assert layer["pattern"] == f"fanin{k}" and header[f"{name}.fanin_indices"]["dtype"] == "U16"
            assert header[f"{name}.fanin_values"]["shape"] == [w.shape[0], k]
        else:
            nblocks = int((w.reshape(w.shape[0] // 4, 4, -1, 4) != 0).any(3).any(1).sum())
            assert layer["pattern"] == "block4x4" and header[f"{name}.bsr_values"]["shape"] == [nblocks, 4, 4]
            assert header[f"{name}.bsr_block_row_ptr"]["shape"] == [w.shape[0] // 4 + 1]
        assert f"{name}" not in header
    loaded = load(out)
    assert loaded.dtype == dtype
    assert_bit_exact(model, loaded)
    # the same checkpoint read back through sparseforge.load(sparse=True): fan-in / BSR SparseLinear layers
    sparse = load(out, sparse=True)
    up = sparse.model.layers[0].mlp.up_proj
    assert type(up).__name__ == "SparseLinear" and up.format == fmt
    assert torch.equal(raw(up.to_dense()), raw(state["model.layers.0.mlp.up_proj.weight"]))


def test_fanin_bsr_fallbacks_and_version_refusal(tmp_path, monkeypatch):
    model, sc = sparsified("fanin", torch.float32)
    w = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w[0, int(torch.nonzero(w[0])[0, 0])] = 0.0  # row 0 now keeps one input fewer: not constant fan-in
    out = save_pretrained(model, tmp_path / "f", sparsity_config=sc)
    layers = read_sparsity_config(out)["layers"]
    assert layers["model.layers.0.mlp.up_proj.weight"]["format"] == "bitmap"
    assert layers["model.layers.0.mlp.down_proj.weight"]["format"] == "fanin"
    assert_bit_exact(model, load(out))
    # a reader of an older format_version refuses the checkpoint instead of misreading it
    monkeypatch.setattr(validation, "FORMAT_VERSION", FORMAT_VERSION - 1)
    with pytest.raises(ModelError, match=f"format_version {FORMAT_VERSION}.*upgrade sparseforge"):
        load(out)
    monkeypatch.undo()
    # a layer whose format (registry since_version 2) is newer than the stated format_version is refused
    config = json.loads((out / "config.json").read_text())
    config["sparsity_config"]["format_version"] = 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="format fanin is stored from format_version 2 on.*format_version 1"):
        load(out)
    # float16 values have no BSR / fan-in kernels: stored as bitmap
    half, sc = sparsified("block4x4", torch.float16)
    block = read_sparsity_config(save_pretrained(half, tmp_path / "h", sparsity_config=sc))
    assert block["format_version"] == FORMAT_VERSION and {v["format"] for v in block["layers"].values()} == {"bitmap"}


def test_bsr_block_mismatch_is_corrupt(tmp_path):
    model, sc = sparsified("block4x4", torch.float32)
    out = save_pretrained(model, tmp_path / "c", sparsity_config=sc)
    config = json.loads((out / "config.json").read_text())
    config["sparsity_config"]["layers"]["model.layers.0.mlp.up_proj.weight"]["pattern"] = "block2x8"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="stores block4x4 blocks but config.json says block2x8"):
        load_state_dict_compressed(out)
