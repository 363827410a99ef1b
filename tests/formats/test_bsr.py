"""BSRWeight: exact round trip, byte layout, block-granular masks, corrupt buffers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats import BSRWeight
from sparseforge.masks import mask_from_scores
from sparseforge.patterns import Block


def test_layout_worked_example():
    w = torch.zeros(4, 6)
    w[2:4, 0:3] = torch.arange(1.0, 7.0).reshape(2, 3)
    w[0, 4] = 9.0
    bw = BSRWeight.from_dense(w, Block(2, 3))
    assert bw.block_row_ptr.tolist() == [0, 1, 2]
    assert bw.block_col.tolist() == [1, 0] and bw.block_col.dtype == torch.uint16
    assert bw.values.tolist() == [[[0.0, 9.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]
    assert torch.equal(bw.to_dense(), w)
    assert int(bw.mask().sum()) == 12  # whole stored blocks
    assert bw.block == Block(2, 3) and bw.nbytes == 3 * 4 + 2 * 2 + 12 * 4


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 4), w=st.integers(1, 5), R=st.integers(0, 5), C=st.integers(1, 6), p=st.floats(0, 1),
       seed=st.integers(0, 999), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_round_trip_is_exact(h, w, R, C, p, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(R * h, C * w, generator=gen).to(dtype)
    mask = torch.rand(R * h, C * w, generator=gen) < p  # any mask: blocks stored when any entry is kept
    bw = BSRWeight.from_dense(weight, (h, w), mask)
    expect = torch.where(mask, weight, torch.zeros((), dtype=dtype))
    assert torch.equal(bw.to_dense(), expect)
    assert bool((bw.mask() >= mask).all())
    again = BSRWeight.from_state_dict(bw.state_dict("x."), (R * h, C * w), "x.")
    assert torch.equal(again.to_dense(), bw.to_dense())


def test_block_pattern_from_masks():
    w = torch.randn(16, 32)
    mask = mask_from_scores(w.abs(), "block4x8", 0.75)
    bw = BSRWeight.from_dense(w, "block4x8", mask)
    assert torch.equal(bw.mask(), mask) and bw.values.shape == (4, 4, 8)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ConfigError, match="divisible by 4x4"):
        BSRWeight.from_dense(torch.randn(6, 8), "block4x4")
    with pytest.raises(ConfigError, match="block pattern"):
        BSRWeight.from_dense(torch.randn(8, 8), "2:4")
    bw = BSRWeight.from_dense(torch.randn(4, 8), "block2x4")
    with pytest.raises(ModelError, match="block_row_ptr"):
        BSRWeight((4, 8), bw.block_row_ptr.long(), bw.block_col, bw.values)
    with pytest.raises(ModelError, match="strictly ascending"):
        BSRWeight((4, 8), torch.tensor([0, 2, 4], dtype=torch.int32),
                  torch.tensor([1, 0, 0, 1], dtype=torch.uint16), bw.values)
    with pytest.raises(ModelError, match="do not tile"):
        BSRWeight((5, 8), bw.block_row_ptr, bw.block_col, bw.values)
    with pytest.raises(ModelError, match="missing"):
        BSRWeight.from_state_dict({}, (4, 8))
