"""CSRWeight.from_bitmap: the same entries as from_dense, values shared, no dense matrix."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseforge.formats.csr as csr_mod
from sparseforge.formats import BitmapWeight
from sparseforge.formats.csr import CSRWeight


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       bf16=st.booleans(), chunk=st.sampled_from([1, 7, 1 << 22]))
def test_from_bitmap_equals_from_dense(rows, cols, density, seed, bf16, chunk):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    mask = torch.rand(rows, cols, generator=gen) < density
    if bf16:
        w = w.bfloat16()
    bw = BitmapWeight.from_dense(w, mask)
    old = csr_mod._CHUNK_WEIGHTS
    csr_mod._CHUNK_WEIGHTS = chunk  # chunks of one row, a few rows, everything
    try:
        c = CSRWeight.from_bitmap(bw)
    finally:
        csr_mod._CHUNK_WEIGHTS = old
    ref = CSRWeight.from_dense(w, mask)
    assert torch.equal(c.row_ptr, ref.row_ptr) and torch.equal(c.col, ref.col)
    assert c.col.dtype == ref.col.dtype and c.values.dtype == w.dtype
    assert torch.equal(c.values.view(torch.int16 if bf16 else torch.int32), ref.values.view(torch.int16 if bf16 else torch.int32))
    assert c.values.data_ptr() == bw.values.data_ptr()  # shared, not copied


def test_from_bitmap_never_builds_the_dense_matrix(monkeypatch):
    w = torch.randn(64, 300)
    bw = BitmapWeight.from_dense(w, w > 1.0)

    def refuse(self):
        raise AssertionError("densified")

    monkeypatch.setattr(BitmapWeight, "to_dense", refuse)
    monkeypatch.setattr(BitmapWeight, "mask", refuse)
    c = CSRWeight.from_bitmap(bw)
    assert torch.equal(c.to_dense(), torch.where(w > 1.0, w, torch.zeros(())))


def test_from_bitmap_wide_layer_uses_int32_indices():
    w = torch.zeros(2, 70000)
    w[0, 69999] = 1.0
    w[1, 3] = 2.0
    c = CSRWeight.from_bitmap(BitmapWeight.from_dense(w))
    assert c.col.dtype == torch.int32 and c.col.tolist() == [69999, 3]
