"""ColumnSparseSiblings: q/k/v and gate/up ColumnSparseLinear layers fused for decoding without losing their
own TEAL thresholds: the module, fuse_projections_ / unfuse_projections_, and the native engine (one bound call
per group, the tokens of generate)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseforge.activation import ActivationSparsityConfig, ColumnSparseLinear, column_sparse_, sparsify_activations_
from sparseforge.activation.column_group import ColumnSparseSiblings
from sparseforge.config import CalibrationConfig
from sparseforge.errors import ModelError
from sparseforge.generation.engine import DecodeEngine
from sparseforge.generation.fuse import FusedSlice, fuse_projections_, unfuse_projections_
from sparseforge.generation.loop import native_generate
from tiny_models import tiny_model, tokens


def _column_model():
    """A tiny Llama, TEAL 50% thresholds calibrated, every projection half pruned and column-stored, k / v / up
    thresholds scaled apart from q / gate."""
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not model.lm_head:
                m.weight.mul_(torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(m.weight.numel())) >= 0.5)
    sparsify_activations_(model, ActivationSparsityConfig(sparsity=0.5, calibration=CalibrationConfig(batch_size=2)),
                          calibration=tokens(4, 16, seed=5), progress=False)
    assert len(column_sparse_(model)) == 7 * len(model.model.layers)
    for layer in model.model.layers:  # siblings with thresholds apart (uniform TEAL gives them one value)
        layer.self_attn.k_proj.threshold.mul_(1.5)
        layer.self_attn.v_proj.threshold.mul_(0.5)
        layer.mlp.up_proj.threshold.mul_(1.5)
    return model


def _members(n_in=64, outs=(32, 16, 16), thresholds=(0.2, 0.7, 1.5)):
    torch.manual_seed(0)
    return [ColumnSparseLinear.from_linear(nn.Linear(n_in, o), threshold=t) for o, t in zip(outs, thresholds)]


def test_siblings_output_is_the_members_side_by_side_with_their_own_thresholds():
    members = _members()
    group = ColumnSparseSiblings(members)
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        assert torch.equal(group(x), torch.cat([m(x) for m in members], dim=-1))
        row = torch.randn(1, 64)
        assert torch.equal(group.bound_gemv()(row), group(row))
        same = ColumnSparseSiblings([members[0], ColumnSparseLinear.from_linear(nn.Linear(64, 32), threshold=0.2)])
        other = ColumnSparseSiblings([members[0], ColumnSparseLinear.from_linear(nn.Linear(64, 32), threshold=5.0)])
        assert not torch.equal(same(row)[:, 32:] - same.members[1].bias, other(row)[:, 32:] - other.members[1].bias)
    assert (group.in_features, group.out_features) == (64, 64)


def test_bound_gemv_is_none_where_a_member_tracks_sparsity():
    members = _members()
    members[1].track_sparsity = True
    assert ColumnSparseSiblings(members).bound_gemv() is None


def test_bad_siblings_are_clear_errors():
    with pytest.raises(ModelError, match="share the input size"):
        ColumnSparseSiblings([*_members(), ColumnSparseLinear.from_linear(nn.Linear(8, 4))])
    with pytest.raises(ModelError, match="ColumnSparseLinear layers"):
        ColumnSparseSiblings([nn.Linear(64, 4)])
    with pytest.raises(ModelError, match="ColumnSparseLinear layers"):
        ColumnSparseSiblings([])


def test_fuse_groups_column_siblings_without_copies_and_unfuse_gives_them_back():
    model = _column_model()
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    assert len({float(m.threshold) for m in (q, k, v)}) == 3  # TEAL: one threshold per projection
    ids = tokens(2, 9, seed=1)
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    report = fuse_projections_(model)
    assert len(report.fused) == 2 * len(model.model.layers) and not report.skipped
    assert isinstance(attn.q_proj, FusedSlice) and isinstance(attn.q_proj.group.layer, ColumnSparseSiblings)
    assert list(attn.q_proj.group.layer.members) == [q, k, v]
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, expected)
    assert unfuse_projections_(model) == 2 * len(model.model.layers)
    assert (attn.q_proj, attn.k_proj, attn.v_proj) == (q, k, v)


def test_engine_calls_each_group_once_and_decodes_the_tokens_of_generate():
    model = _column_model()
    ids = tokens(1, 6, seed=2)
    with torch.inference_mode():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                  do_sample=False, pad_token_id=0)
    engine = DecodeEngine(model, 14)  # fuse=True: q/k/v and gate/up grouped
    layers = len(model.model.layers)
    assert engine.call_paths == {"bound": 4 * layers + 1}  # qkv, o, gate/up, down per layer; the lm_head
    assert torch.equal(native_generate(model, ids, max_new_tokens=8, min_new_tokens=8), expected)
