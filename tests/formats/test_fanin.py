"""FanInWeight: exact round trip, byte layout, refusal of unequal rows, corrupt buffers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats import FanInWeight
from sparseforge.masks import mask_from_scores


def _fanin_mask(rows, cols, k, seed=0):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    return torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)


def test_layout_worked_example():
    w = torch.tensor([[0.0, 1.5, 2.0, 0.0], [3.0, 0.0, 0.0, -1.0]])
    fw = FanInWeight.from_dense(w)
    assert fw.k == 2 and fw.indices.dtype == torch.uint16
    assert fw.indices.tolist() == [[1, 2], [0, 3]]
    assert fw.values.tolist() == [[1.5, 2.0], [3.0, -1.0]]
    assert fw.nbytes == 4 * 4 + 4 * 2
    assert torch.equal(fw.mask(), w != 0)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 12), cols=st.integers(1, 40), frac=st.floats(0, 1), seed=st.integers(0, 999),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_round_trip_is_exact(rows, cols, frac, seed, dtype):
    k = round(frac * cols)
    mask = _fanin_mask(rows, cols, k, seed)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    w[0:1, :1] = -0.0  # kept -0.0 stays -0.0 when the mask keeps it
    fw = FanInWeight.from_dense(w, mask)
    assert fw.k == (k if rows else 0) and fw.values.dtype == dtype
    expect = torch.where(mask, w, torch.zeros((), dtype=dtype))
    assert torch.equal(fw.to_dense().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       expect.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    again = FanInWeight.from_state_dict(fw.state_dict("l."), (rows, cols), "l.")
    assert torch.equal(again.to_dense(), fw.to_dense())


def test_pattern_from_masks_is_accepted():
    w = torch.randn(16, 32)
    mask = mask_from_scores(w.abs(), "fanin8", None)
    assert FanInWeight.from_dense(w, mask).k == 8


def test_unequal_rows_are_refused_clearly():
    w = torch.randn(3, 8)
    mask = _fanin_mask(3, 8, 4)
    mask[2, mask[2].nonzero()[0]] = False
    with pytest.raises(ConfigError, match="row 0 keeps 4 and row 2 keeps 3.*fanin"):
        FanInWeight.from_dense(w, mask)
    with pytest.raises(ConfigError, match="float32 or bfloat16"):
        FanInWeight.from_dense(w.double(), _fanin_mask(3, 8, 2))


def test_wide_layers_get_int32_indices():
    w = torch.zeros(2, 70000)
    w[:, [5, 69999]] = 1.0
    fw = FanInWeight.from_dense(w)
    assert fw.indices.dtype == torch.int32 and torch.equal(fw.to_dense(), w)


def test_corrupt_buffers_are_refused():
    fw = FanInWeight.from_dense(torch.randn(4, 10), _fanin_mask(4, 10, 3))
    with pytest.raises(ModelError, match="strictly ascending"):
        FanInWeight((4, 10), fw.values, fw.indices.int().flip(1).to(torch.uint16))
    with pytest.raises(ModelError, match="uint16"):
        FanInWeight((4, 10), fw.values, fw.indices.to(torch.int32))
    with pytest.raises(ModelError, match="shape"):
        FanInWeight((4, 10), fw.values, fw.indices[:, :2].contiguous())
    with pytest.raises(ModelError, match="missing"):
        FanInWeight.from_state_dict({"fanin_values": fw.values}, (4, 10))
