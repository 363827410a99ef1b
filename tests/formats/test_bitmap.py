"""BitmapWeight: hand-computed bytes, property round trips, validation of corrupt buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats import BitmapWeight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so -0.0 != +0.0 and NaN == NaN when payloads agree."""
    return t.contiguous().view(_INT_VIEW[t.dtype])


def reference(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The documented meaning of ``w * mask``: kept bits exact, pruned entries +0.0."""
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype))


def test_bit_order_hand_computed():
    w = torch.zeros(2, 10)
    w[0, 0], w[0, 3], w[0, 8] = 1.0, 2.0, 3.0  # bits 0 and 3 of byte 0; bit 0 of byte 1
    w[1, 7], w[1, 9] = 4.0, 5.0  # bit 7 of byte 0; bit 1 of byte 1
    bw = BitmapWeight.from_dense(w)
    assert bw.bitmap.dtype == torch.uint8
    assert bw.bitmap.tolist() == [[0x09, 0x01], [0x80, 0x02]]
    assert bw.values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # row-major
    assert bw.row_offsets.tolist() == [0, 3, 5]
    assert bw.nnz == 5 and bw.nbytes == 4 + 5 * 4


def test_full_byte_and_padding_bits_zero():
    w = torch.ones(1, 9)
    bw = BitmapWeight.from_dense(w)
    assert bw.bitmap.tolist() == [[0xFF, 0x01]]  # bits 1..7 of the last byte are padding = 0


def test_zero_handling_documented():
    w = torch.tensor([[-0.0, 0.0, -1.0, float("nan"), float("inf")]])
    bw = BitmapWeight.from_dense(w)  # mask None -> w != 0: both zeros pruned, NaN/inf kept
    assert bw.mask().tolist() == [[False, False, True, True, True]]
    out = bw.to_dense()
    assert torch.equal(bits(out[:, :2]), bits(torch.zeros(1, 2)))  # +0.0, sign not kept
    keep = torch.tensor([[True, False, False, True, True]])  # explicit mask keeps -0.0
    bw2 = BitmapWeight.from_dense(w, keep)
    assert bw2.nnz == 3
    assert torch.equal(bits(bw2.to_dense()), bits(reference(w, keep)))
    assert bits(bw2.to_dense())[0, 0] == bits(torch.tensor(-0.0))


@st.composite
def weight_and_mask(draw):
    rows = draw(st.integers(1, 9))
    cols = draw(st.integers(1, 21))
    w = draw(hnp.arrays(np.float32, (rows, cols), elements=st.floats(width=32)))  # NaN, inf, -0.0 included
    kind = draw(st.sampled_from(["random", "none", "all", "empty", "empty_rows"]))
    if kind == "random":
        mask = draw(hnp.arrays(np.bool_, (rows, cols)))
    elif kind == "all":
        mask = np.ones((rows, cols), bool)
    elif kind == "empty":
        mask = np.zeros((rows, cols), bool)
    elif kind == "empty_rows":
        mask = draw(hnp.arrays(np.bool_, (rows, cols)))
        mask[:: 2] = False
    else:
        mask = None
    if draw(st.booleans()):
        w = np.where(draw(hnp.arrays(np.bool_, (rows, cols))), w, np.float32(0))  # many zeros
    return torch.from_numpy(w.copy()), None if mask is None else torch.from_numpy(mask.copy())


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=60, deadline=None)
@given(data=weight_and_mask())
def test_round_trip_bit_exact(dtype, data):
    w, mask = data
    w = w.to(dtype)
    bw = BitmapWeight.from_dense(w, mask)
    keep = (w != 0) if mask is None else mask
    assert torch.equal(bw.mask(), keep)
    assert bw.nnz == int(keep.sum())
    assert bw.values.dtype == dtype
    assert torch.equal(bits(bw.to_dense()), bits(reference(w, keep)))
    finite = torch.isfinite(w).all()
    if finite:  # the brief's w * mask, compared by value
        assert torch.equal(bw.to_dense(), w * keep)
    # row offsets are prefix counts
    assert bw.row_offsets.tolist() == [0] + torch.cumsum(keep.sum(1), 0).tolist()
    # state dict round trip
    again = BitmapWeight.from_state_dict(bw.state_dict("x."), bw.shape, "x.")
    assert torch.equal(bits(again.to_dense()), bits(bw.to_dense()))


def test_all_zero_and_zero_size():
    bw = BitmapWeight.from_dense(torch.zeros(3, 5, dtype=torch.bfloat16))
    assert bw.nnz == 0 and bw.bitmap.shape == (3, 1)
    assert torch.equal(bw.to_dense(), torch.zeros(3, 5, dtype=torch.bfloat16))
    empty = BitmapWeight.from_dense(torch.zeros(0, 7))
    assert empty.bitmap.shape == (0, 1) and empty.to_dense().shape == (0, 7)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="2-D"):
        BitmapWeight.from_dense(torch.ones(2, 2, 2))
    with pytest.raises(ConfigError, match="floating"):
        BitmapWeight.from_dense(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ConfigError, match="torch.bool"):
        BitmapWeight.from_dense(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ConfigError, match="shape"):
        BitmapWeight.from_dense(torch.ones(2, 2), torch.ones(2, 3, dtype=torch.bool))


def test_corrupt_buffers_rejected():
    bw = BitmapWeight.from_dense(torch.tensor([[1.0, 0.0, 2.0]]))
    with pytest.raises(ModelError, match="values are stored"):
        BitmapWeight((1, 3), bw.bitmap, bw.values[:1])
    with pytest.raises(ModelError, match="padding bits"):
        BitmapWeight((1, 3), torch.tensor([[0b1101]], dtype=torch.uint8), torch.ones(3))
    with pytest.raises(ModelError, match="uint8"):
        BitmapWeight((1, 3), bw.bitmap.to(torch.int32), bw.values)
    with pytest.raises(ModelError, match="missing"):
        BitmapWeight.from_state_dict({"bitmap": bw.bitmap}, (1, 3))
