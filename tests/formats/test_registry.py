"""One format registry: a format registered once flows through SparseLinear, compress_, the ops,
the checkpoint reader and both loaders, with no other code naming it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from sparseforge import ops
import sparseforge as sf
from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats import BitmapWeight, BSRWeight, ColumnBitmapWeight, CSRWeight, FanInWeight, NMWeight, registry
from sparseforge.formats.registry import FormatSpec
from sparseforge.io.checkpoint import save_pretrained
from sparseforge.io.layout import load_state_dict_compressed, read_sparsity_config
from sparseforge.io.loading import load, load_sparse
from sparseforge.nn import SparseLinear
from sparseforge.patterns import NM, Block, FanIn
from sparseforge.runtime.compress import compress_
from tiny_models import tiny_model, tokens


@dataclass(frozen=True, eq=False)
class ToyWeight(BitmapWeight):
    """A toy format: the bitmap layout under another name, multiplied by the bitmap kernels."""


TOY = FormatSpec(
    "toy", ToyWeight, general=False, rank=35, kernels="bitmap",
    build=lambda w, pattern, keep: ToyWeight.from_dense(w, keep),
    load=lambda state, shape, pattern, prefix="": ToyWeight.from_state_dict(state, shape, prefix=prefix),
)  # fmt: skip


@pytest.fixture
def toy():
    registry.register(TOY)
    yield TOY
    registry.unregister("toy")


def pruned_linear(out=8, inp=16, seed=0) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(out, inp, generator=g) > 0.6)  # ~60% zeros
    return lin


def test_the_builtin_formats_are_registered_once():
    assert registry.names() == ("bitmap", "nm", "csr", "fanin", "bsr", "colbitmap")
    assert registry.names(general=True) == ("bitmap", "nm", "csr") == sf.nn.FORMATS
    assert registry.names(stored=True) == ("bitmap", "nm", "fanin", "bsr")
    assert registry.names(sparse_linear=False) == ("colbitmap",)  # run by ColumnSparseLinear, not SparseLinear
    assert "colbitmap" not in sf.nn.sparse_linear.ALL_FORMATS
    for cls in (BitmapWeight, NMWeight, CSRWeight, FanInWeight, BSRWeight, ColumnBitmapWeight):
        assert registry.get(registry.spec_of(object.__new__(cls)).name).cls is cls
    with pytest.raises(ConfigError, match="unknown sparse format 'coo'.*bitmap"):
        registry.get("coo")


def test_labels_name_the_recorded_pattern():
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 3.0, 4.0, 0.0]] * 4)  # (4, 8), 2:4, 4 kept per row
    assert registry.label(registry.get("nm").build(w, None, None)) == "nm 2:4"  # the default N:M
    assert registry.label(registry.get("nm").build(w, NM(4, 8), None)) == "nm 4:8"
    assert registry.label(registry.get("fanin").build(w, None, None)) == "fanin"
    assert registry.spec_of(registry.get("fanin").build(w, None, None)).pattern_of(FanInWeight.from_dense(w)) == FanIn(4)
    blocks = torch.ones(4, 8)
    blocks[:, 4:] = 0
    assert registry.label(registry.get("bsr").build(blocks, Block(2, 4), None)) == "bsr block2x4"
    with pytest.raises(ConfigError, match="needs a block pattern"):
        registry.get("bsr").build(blocks, None, None)


def test_a_name_or_class_registers_once(toy):
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(FormatSpec("toy", CSRWeight, build=TOY.build, load=TOY.load))
    with pytest.raises(ConfigError, match="already registered as format 'toy'"):
        registry.register(FormatSpec("toy2", ToyWeight, build=TOY.build, load=TOY.load))


def test_a_registered_format_flows_through_sparse_linear_compress_and_ops(toy):
    lin = pruned_linear()
    x = torch.randn(3, 16)
    sl = SparseLinear.from_linear(lin, "toy")
    assert sl.format == "toy" and type(sl.weight_format) is ToyWeight
    torch.testing.assert_close(sl(x), lin(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.linear(x, sl.weight_format, None), x @ lin.weight.detach().T, atol=1e-5, rtol=1e-5)
    again = SparseLinear.from_linear(pruned_linear(seed=1), "toy")
    again.load_state_dict(sl.state_dict())  # rebuilt through the registry's loader
    assert type(again.weight_format) is ToyWeight and torch.equal(again.to_dense(), sl.to_dense())
    net = torch.nn.Sequential(pruned_linear(), torch.nn.ReLU(), pruned_linear(16, 8, seed=2))
    report = compress_(net, format="toy")
    assert [c.format for c in report.converted] == ["toy", "toy"]
    assert all(isinstance(m.weight_format, ToyWeight) for m in net.modules() if isinstance(m, SparseLinear))


def test_a_format_without_kernels_is_refused_by_the_ops(toy):
    registry.unregister("toy")
    registry.register(FormatSpec("toy", ToyWeight, kernels="nothing", build=TOY.build, load=TOY.load))
    with pytest.raises(ModelError, match="no sparse kernels for format 'toy'"):
        ops.linear(torch.randn(1, 16), ToyWeight.from_dense(pruned_linear().weight.detach()))


def test_a_registered_format_flows_through_a_checkpoint(toy, tmp_path):
    model = tiny_model("llama")
    sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", pattern="unstructured", sparsity=0.6), progress=False)
    out = save_pretrained(model, tmp_path / "m", sparsity_config={"method": "magnitude", "pattern": "unstructured",
                                                                   "targets": None, "ignore": []})
    config = json.loads((out / "config.json").read_text())
    for layer in config["sparsity_config"]["layers"].values():
        assert layer["format"] == "bitmap"
        layer["format"] = "toy"  # the toy layout is the bitmap layout: only the name changes
    (out / "config.json").write_text(json.dumps(config))
    layers = read_sparsity_config(out)["layers"]
    state = load_state_dict_compressed(out)
    assert all(type(state[name]) is ToyWeight for name in layers)
    ids = tokens(2, 8)
    with torch.no_grad():
        expected = model(ids).logits
        dense, sparse = load(out)(ids).logits, load_sparse(out, format="stored")
    assert {m.format for m in sparse.modules() if isinstance(m, SparseLinear)} == {"toy"}
    torch.testing.assert_close(dense, expected)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, expected, atol=1e-4, rtol=1e-4)
