"""Projection fusion (sparseforge.generation.fuse): the fused layer computes what the separate ones did."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseforge.generation.fuse import FusedProjections, FusedSlice, fuse_projections_, unfuse_projections_
from sparseforge.nn.sparse_linear import SparseLinear
from tiny_models import tiny_model, tokens


class Block(nn.Module):
    """A module holding a q/k/v group and a gate/up group, called like a Llama block calls them."""

    def __init__(self, dim: int, sizes: tuple[int, int, int], ffn: int, bias: bool) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, s, bias=bias) for s in sizes)
        self.gate_proj, self.up_proj = nn.Linear(dim, ffn, bias=bias), nn.Linear(dim, ffn, bias=bias)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (..., sizes[i]) each
        return torch.cat([q, k, v, torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)], dim=-1)


def _prune_2_4(layer: nn.Linear) -> None:
    with torch.no_grad():
        w = layer.weight.view(layer.out_features, -1, 4)  # (out, in / 4, 4)
        drop = w.abs().argsort(dim=-1)[..., :2]  # the two smallest of every 4
        w.scatter_(-1, drop, 0.0)


@settings(max_examples=25, deadline=None)
@given(dim=st.sampled_from([8, 16, 24]), q=st.integers(1, 24), kv=st.integers(1, 12), ffn=st.integers(1, 20),
       bias=st.booleans(), fmt=st.sampled_from(["dense", "bitmap", "nm", "csr"]), batch=st.integers(1, 3),
       seed=st.integers(0, 10_000))
def test_fused_block_matches_the_separate_layers(dim, q, kv, ffn, bias, fmt, batch, seed):
    torch.manual_seed(seed)
    block = Block(dim, (q, kv, kv), ffn, bias).eval()
    if fmt != "dense":
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            _prune_2_4(getattr(block, name))
            setattr(block, name, SparseLinear.from_linear(getattr(block, name), format=fmt,
                                                          pattern="2:4" if fmt == "nm" else None))
    x = torch.randn(batch, 3, dim)
    with torch.no_grad():
        expected = block(x)
        report = fuse_projections_(block)
        assert len(report.fused) == 2 and not report.skipped
        assert isinstance(block.q_proj, FusedSlice) and isinstance(block.fused_gate_up, FusedProjections)
        if fmt != "dense":
            assert isinstance(block.fused_q_k_v.layer, SparseLinear) and block.fused_q_k_v.layer.format == fmt
        got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_new_input_is_recomputed_not_served_from_the_last_one():
    torch.manual_seed(0)
    block = Block(8, (4, 4, 4), 6, bias=False).eval()
    ref = copy.deepcopy(block)
    fuse_projections_(block)
    x1, x2 = torch.randn(1, 8), torch.randn(1, 8)
    with torch.no_grad():
        block.q_proj(x1)  # k and v of x1 are now pending
        torch.testing.assert_close(block.k_proj(x2), ref.k_proj(x2))  # another input: its own k
        torch.testing.assert_close(block.v_proj(x1), ref.v_proj(x1))


def test_the_group_holds_no_tensor_once_every_member_was_served():
    block = Block(8, (4, 4, 4), 6, bias=True).eval()
    fuse_projections_(block)
    x = torch.randn(2, 8)
    with torch.no_grad():
        block(x)
    assert block.fused_q_k_v._output is None and block.fused_q_k_v._input is None


def test_fusing_a_tiny_llama_keeps_its_logits_and_unfusing_restores_its_weights():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokens(2, 12)
    with torch.no_grad():
        expected = model(ids).logits
        report = fuse_projections_(model)
        assert len(report.fused) == 2 * model.config.num_hidden_layers
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert fuse_projections_(model).fused == []  # idempotent: nothing left to fuse
        assert unfuse_projections_(model) == 2 * model.config.num_hidden_layers
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_mixed_groups_are_reported_and_left_alone():
    block = Block(8, (4, 4, 4), 8, bias=False).eval()
    _prune_2_4(block.v_proj)
    block.v_proj = SparseLinear.from_linear(block.v_proj, format="bitmap")
    report = fuse_projections_(block)
    assert report.fused == ["<root>:gate_proj+up_proj"]
    (where, why), = report.skipped
    assert where == "<root>:q_proj+k_proj+v_proj" and "differ" in why
    assert isinstance(block.q_proj, nn.Linear) and isinstance(block.v_proj, SparseLinear)


@pytest.mark.parametrize("fmt, dtype", [("bitmap", torch.int8), ("nm", torch.bfloat16), ("csr", torch.int8),
                                        ("fanin", torch.float32), ("bsr", torch.float32)])
def test_sparse_groups_are_fused_by_joining_buffers_never_densified(fmt, dtype, monkeypatch):
    torch.manual_seed(0)
    block = Block(16, (8, 4, 4), 12, bias=True).eval()
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        layer = getattr(block, name)
        _prune_2_4(layer)  # 2 of every 4 inputs: also a constant fan-in of 8
        pattern = {"nm": "2:4", "bsr": "block1x2"}.get(fmt)
        setattr(block, name, SparseLinear.from_linear(layer, format=fmt, pattern=pattern, dtype=dtype))
    x = torch.randn(1, 16)
    with torch.no_grad():
        expected = block(x)
        for cls in {type(getattr(block, n).weight_format) for n in ("q_proj", "gate_proj")}:
            monkeypatch.setattr(cls, "to_dense", lambda self: pytest.fail("fusion densified a sparse weight"))
        report = fuse_projections_(block)
        monkeypatch.undo()
        assert len(report.fused) == 2
        fused = block.fused_q_k_v.layer
        assert fused.format == fmt and fused.weight_format.dtype == dtype
        got = block(x)
    assert torch.equal(got, expected)  # batch 1: every row summed as its own layer sums it


def test_the_fused_layer_takes_its_members_tiles(monkeypatch):
    import sparseforge.measure.lanes_tile as lt
    from sparseforge.measure.lanes_tile import LanesTile

    monkeypatch.setattr(lt, "measured_tile", lambda w, b, **kw: (LanesTile(256, 32), None))
    torch.manual_seed(0)
    block = Block(512, (512, 512, 512), 512, bias=False).eval()
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        _prune_2_4(getattr(block, name))
        setattr(block, name, SparseLinear.from_linear(getattr(block, name), format="bitmap"))
        getattr(block, name).measure_lanes_tiles((64,))
    block.gate_proj.lanes_tile = block.up_proj.lanes_tile = LanesTile(128, 0)  # fixed on every member
    monkeypatch.setattr(lt, "measured_tile", lambda *a, **kw: pytest.fail("fusion measured a tile"))
    fuse_projections_(block)
    assert block.fused_q_k_v.layer.lanes_tiles == {64: LanesTile(256, 32)}
    assert block.fused_gate_up.layer.lanes_tile == LanesTile(128, 0)
