"""compress_ (swap pruned linears for SparseLinear, with a report) and load_sparse (no dense weights)."""

from __future__ import annotations

import pytest
import torch

import transformers  # noqa: F401  (test dependency: missing means failure)

from tiny_models import tiny_model, tokens  # noqa: E402

import sparseforge as sf  # noqa: E402
from sparseforge.errors import ConfigError, ModelError  # noqa: E402
from sparseforge.formats import BitmapWeight, BSRWeight, FanInWeight, NMWeight  # noqa: E402
from sparseforge.formats.rule import CSR_FROM, auto_format  # noqa: E402
from sparseforge.io.checkpoint import save_pretrained  # noqa: E402
from sparseforge.io.loading import load, load_sparse  # noqa: E402
from sparseforge.nn import SparseLinear  # noqa: E402
from sparseforge.patterns import NM  # noqa: E402
from sparseforge.runtime.compress import compress_  # noqa: E402

PRUNINGS = {"2:4": dict(pattern="2:4"), "90%": dict(pattern="unstructured", sparsity=0.9),
            "fanin": dict(pattern="fanin", sparsity=0.5), "block4x4": dict(pattern="block4x4", sparsity=0.5)}
STORED_AS = {"2:4": "nm", "90%": "bitmap", "fanin": "fanin", "block4x4": "bsr"}  # checkpoint layer format
LOADED_AS = {**STORED_AS, "90%": "csr"}  # load_sparse(format="rule"): bitmap >= 85% sparsity runs as CSR


def pruned(family: str, which: str):
    model = tiny_model(family)
    sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", **PRUNINGS[which]), progress=False)
    return model


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def sparse_layers(model) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@pytest.mark.parametrize("which,expect", [("2:4", "nm 2:4"), ("90%", "csr")])
def test_compress_llama_same_logits_rule(which, expect):
    model = pruned("llama", which)
    ids = tokens(3, 12)
    before = logits(model, ids)
    report = compress_(model, "rule")
    assert len(report.converted) == 14 and {c.format for c in report.converted} == {expect}
    assert report.kept_dense == [("lm_head", "sparsity 0.000 < min_sparsity 0.300")]
    assert set(sparse_layers(model)) == {c.name for c in report.converted}
    torch.testing.assert_close(logits(model, ids), before, atol=1e-4, rtol=1e-4)
    assert "kept dense lm_head" in report.summary()


@pytest.mark.parametrize("fmt", ["bitmap", "csr", "nm"])
def test_compress_explicit_formats_same_logits(fmt):
    model = pruned("llama", "2:4")
    ids = tokens(2, 9)
    before = logits(model, ids)
    report = compress_(model, fmt, dtype=None)
    assert {m.format for m in sparse_layers(model).values()} == {fmt} and len(report.converted) == 14
    torch.testing.assert_close(logits(model, ids), before, atol=1e-4, rtol=1e-4)


def test_compress_bf16_values_looser():
    model = pruned("llama", "90%")
    ids = tokens(2, 9)
    before = logits(model, ids)
    compress_(model, "rule", dtype=torch.bfloat16)
    assert all(m.weight_format.dtype == torch.bfloat16 for m in sparse_layers(model).values())
    torch.testing.assert_close(logits(model, ids), before, atol=5e-2, rtol=5e-2)


def test_compress_gpt2_conv1d():
    model = pruned("gpt2", "2:4")
    ids = tokens(2, 9)
    before = logits(model, ids)
    report = compress_(model, "rule")
    assert len(report.converted) == 8  # c_attn, c_proj, c_fc, mlp.c_proj x 2 blocks
    torch.testing.assert_close(logits(model, ids), before, atol=1e-4, rtol=1e-4)


def test_nm_on_non_nm_weight_is_a_clear_error_and_leaves_model_unchanged():
    model = pruned("llama", "2:4")
    with torch.no_grad():  # the last layer breaks 2:4; the 13 before it are fine
        model.model.layers[1].mlp.down_proj.weight[0, :4] = 1.0
    with pytest.raises(ConfigError, match=r"layer model\.layers\.1\.mlp\.down_proj: .*violates 2:4"):
        compress_(model, "nm")
    assert not sparse_layers(model)  # layers built before the bad one were not swapped in


def test_targets_ignore_and_errors():
    model = pruned("llama", "2:4")
    report = compress_(model, "rule", targets=["*.mlp.*"], ignore=["*.down_proj"])
    assert {c.name.rsplit(".", 1)[1] for c in report.converted} == {"gate_proj", "up_proj"}
    assert ("model.layers.0.mlp.down_proj", "matches ignore pattern '*.down_proj'") in report.kept_dense
    model = pruned("llama", "2:4")
    with pytest.raises(ConfigError, match="LlamaRMSNorm.*nn.Linear / Conv1D layers only"):
        compress_(model, targets=["model.norm"])
    with pytest.raises(ConfigError, match="matches no module"):
        compress_(model, targets=["*.nothing"])
    with pytest.raises(ConfigError, match="unknown format"):
        compress_(model, "coo")
    with pytest.raises(ConfigError, match="not a string"):
        compress_(model, targets="*.mlp.*")


def test_dense_and_tied_layers_are_reported_not_converted():
    model = tiny_model("llama")
    report = compress_(model)
    assert not report.converted and len(report.kept_dense) == 15
    lin = torch.nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(8, 8) < 0.3)
    net = torch.nn.Sequential(lin, torch.nn.Linear(8, 8))
    net[1].weight = lin.weight  # tied
    report = compress_(net)
    assert not report.converted
    assert [why.startswith("weight is tied") for _, why in report.kept_dense] == [True, True]


def test_auto_format_rule():
    w = torch.zeros(4, 8)
    w[:, ::4] = 1.0  # 75% zeros, obeys 2:4 and 1:4
    assert auto_format(w) == ("nm", NM(2, 4))
    assert auto_format(w, "1:4") == ("nm", NM(1, 4))
    w = torch.zeros(4, 16)
    w[:, 0] = 1.0  # 93.75% zeros: CSR beats the detected 2:4
    assert auto_format(w) == ("csr", None)
    assert auto_format(w, "1:8") == ("nm", NM(1, 8))  # a recorded pattern wins
    w = torch.ones(4, 8)
    w[:, :2] = 0
    w[0, 2:] = 0  # row 0 empty; group 0 of row 1 keeps 2, group 1 keeps 4 -> not 2:4
    assert auto_format(w) == ("bitmap", None)
    assert CSR_FROM == 0.85


@pytest.mark.parametrize("which", ["2:4", "90%", "fanin", "block4x4"])
def test_load_sparse_matches_load_without_dense_weights(tmp_path, monkeypatch, which):
    model = pruned("llama", which)
    pattern = PRUNINGS[which]["pattern"]
    save_pretrained(model, tmp_path / "m", sparsity_config={"method": "magnitude", "pattern": pattern,
                                                           "targets": None, "ignore": []})
    ids = tokens(2, 10)
    expected = logits(load(tmp_path / "m"), ids)

    def refuse(self):
        raise AssertionError("load_sparse built a dense pruned weight")

    for cls in (BitmapWeight, NMWeight, FanInWeight, BSRWeight):
        monkeypatch.setattr(cls, "to_dense", refuse)
    with pytest.raises(AssertionError, match="dense pruned weight"):  # the patch bites the dense loader
        load(tmp_path / "m")
    sparse = load_sparse(tmp_path / "m")
    layers = sparse_layers(sparse)
    assert len(layers) == 14
    assert len(sparse_layers(load(tmp_path / "m", sparse=True))) == 14  # the same loader behind sparseforge.load
    assert {m.format for m in layers.values()} == {LOADED_AS[which]}
    torch.testing.assert_close(logits(sparse, ids), expected, atol=1e-4, rtol=1e-4)
    stored = load(tmp_path / "m", sparse=True, format="stored")
    assert {m.format for m in sparse_layers(stored).values()} == {STORED_AS[which]}
    torch.testing.assert_close(logits(stored, ids), expected, atol=1e-4, rtol=1e-4)
    assert not any(t.is_meta for t in list(sparse.parameters()) + list(sparse.buffers()))


def test_load_format_errors(tmp_path):
    save_pretrained(pruned("llama", "90%"), tmp_path / "m", sparsity_config={"method": "magnitude", "pattern": "unstructured",
                                                                           "targets": None, "ignore": []})
    with pytest.raises(ConfigError, match="one of rule, stored"):
        load_sparse(tmp_path / "m", format="csr")
    with pytest.raises(ConfigError, match="needs sparse=True"):
        load(tmp_path / "m", format="stored")


def test_load_sparse_refuses_a_dense_checkpoint(tmp_path):
    model = pruned("llama", "2:4")
    save_pretrained(model, tmp_path / "d", compressed=False, sparsity_config={})
    with pytest.raises(ModelError, match="not a compressed sparseforge checkpoint"):
        load_sparse(tmp_path / "d")


@pytest.mark.parametrize("family,count", [("gpt2", 8), ("opt", 12)])
def test_load_sparse_conv1d_and_tied_embedding(tmp_path, family, count):
    # GPT-2: Conv1D layers stored transposed; OPT: lm_head tied to the embedding, whose zero
    # padding row makes the saver compress it, so it is decompressed for the embedding
    model = pruned(family, "2:4")
    save_pretrained(model, tmp_path / "m", sparsity_config={"method": "magnitude", "pattern": "2:4",
                                                           "targets": None, "ignore": []})
    ids = tokens(2, 10)
    sparse = load_sparse(tmp_path / "m")
    assert len(sparse_layers(sparse)) == count
    torch.testing.assert_close(logits(sparse, ids), logits(load(tmp_path / "m"), ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(sparse, ids), logits(model, ids), atol=1e-4, rtol=1e-4)


def _structured_net(pattern: str, sparsity) -> torch.nn.Sequential:
    from sparseforge.masks import mask_from_scores

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight.mul_(mask_from_scores(lin.weight.abs(), pattern, sparsity))
    return net


@pytest.mark.parametrize("fmt,pattern,sparsity,label", [("fanin", "fanin4", None, "fanin"),
                                                        ("bsr", "block4x4", 0.5, "bsr block4x4")])
def test_compress_fanin_and_bsr_same_outputs(fmt, pattern, sparsity, label):
    x = torch.randn(5, 32)
    for how in (fmt, "rule"):  # explicit format, or the recorded pattern mapped by the rule
        net = _structured_net(pattern, sparsity)
        before = net(x)
        report = compress_(net, how, pattern=pattern)
        assert [c.format for c in report.converted] == [label, label]
        assert all(isinstance(net[i], SparseLinear) and net[i].format == fmt for i in (0, 2))
        torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)


def test_compress_bsr_without_block_pattern_and_fanin_on_unequal_rows_are_clear_errors():
    net = _structured_net("block4x4", 0.5)
    with pytest.raises(ConfigError, match="block pattern"):
        compress_(net, "bsr")
    net = _structured_net("unstructured", 0.5)
    with pytest.raises(ConfigError, match="same number of inputs"):
        compress_(net, "fanin")
    assert not any(isinstance(m, SparseLinear) for m in net.modules())
