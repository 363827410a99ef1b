"""CSRWeight: exact round trip, narrowest index types, validation of corrupt buffers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats.csr import CSRWeight, index_dtype


def test_index_dtype_is_narrowest():
    assert index_dtype(1) == torch.uint16
    assert index_dtype(65536) == torch.uint16
    assert index_dtype(65537) == torch.int32


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(0, 12), cols=st.integers(1, 40), density=st.floats(0, 1), seed=st.integers(0, 999),
       bf16=st.booleans())
def test_round_trip_is_exact(rows, cols, density, seed, bf16):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    if bf16:
        w = w.bfloat16()
    mask = torch.rand(rows, cols, generator=gen) < density
    cw = CSRWeight.from_dense(w, mask)
    assert torch.equal(cw.mask(), mask)
    assert torch.equal(cw.to_dense(), torch.where(mask, w, torch.zeros((), dtype=w.dtype)))
    assert cw.nnz == int(mask.sum())
    assert cw.dtype == w.dtype
    again = CSRWeight.from_state_dict(cw.state_dict("l."), cw.shape, "l.")
    assert torch.equal(again.to_dense(), cw.to_dense())


def test_defaults_keep_nonzeros_and_store_explicit_zeros_with_mask():
    w = torch.tensor([[0.0, -0.0, 1.0], [float("nan"), 0.0, float("inf")]])
    cw = CSRWeight.from_dense(w)
    assert cw.row_ptr.tolist() == [0, 1, 3]
    assert cw.col.tolist() == [2, 0, 2]
    mask = torch.ones(2, 3, dtype=torch.bool)
    full = CSRWeight.from_dense(w, mask)
    assert full.nnz == 6 and torch.equal(full.to_dense().isnan(), w.isnan())
    assert torch.equal(torch.signbit(full.to_dense()), torch.signbit(w))  # kept -0.0 stays -0.0
    assert full.nbytes == 3 * 4 + 6 * 2 + 6 * 4


def test_wide_matrix_uses_int32_indices():
    w = torch.zeros(2, 70000)
    w[0, 69999] = 1.0
    w[1, 3] = 2.0
    cw = CSRWeight.from_dense(w)
    assert cw.col.dtype == torch.int32 and cw.col.tolist() == [69999, 3]
    assert torch.equal(cw.to_dense(), w)


def test_bad_inputs_to_from_dense():
    with pytest.raises(ConfigError, match="2-D"):
        CSRWeight.from_dense(torch.zeros(3))
    with pytest.raises(ConfigError, match="float32 or bfloat16"):
        CSRWeight.from_dense(torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ConfigError, match="mask"):
        CSRWeight.from_dense(torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool))


def test_corrupt_buffers_are_rejected():
    cw = CSRWeight.from_dense(torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))
    shape = cw.shape
    with pytest.raises(ModelError, match="row_ptr"):
        CSRWeight(shape, cw.row_ptr.long(), cw.col, cw.values)
    with pytest.raises(ModelError, match="row_ptr must start at 0"):
        CSRWeight(shape, torch.tensor([0, 2, 2], dtype=torch.int32), cw.col, cw.values)
    with pytest.raises(ModelError, match="narrowest"):
        CSRWeight(shape, cw.row_ptr, cw.col.to(torch.int32), cw.values)
    with pytest.raises(ModelError, match=">= 3"):
        CSRWeight(shape, cw.row_ptr, torch.tensor([0, 3, 1], dtype=torch.int32).to(torch.uint16), cw.values)
    with pytest.raises(ModelError, match="ascending"):
        CSRWeight(shape, cw.row_ptr, torch.tensor([2, 0, 1], dtype=torch.int32).to(torch.uint16), cw.values)
    with pytest.raises(ModelError, match="missing"):
        CSRWeight.from_state_dict({}, shape)
