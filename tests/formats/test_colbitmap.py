"""Column bitmap format (sparseforge.formats.colbitmap): exact round trips, the documented byte
layout, the derived block pointers, conversions from the row-major formats, corrupt buffers."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats import BitmapWeight, CSRWeight, NMWeight, registry
from sparseforge.formats import colbitmap
from sparseforge.formats.colbitmap import BLOCK_COLUMNS, ColumnBitmapWeight


def _pruned(rows, cols, sparsity, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0.0
    return w.to(dtype)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 1200), cols=st.integers(0, 40), sparsity=st.floats(0.0, 1.0),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_and_layout(rows, cols, sparsity, bf16, seed):
    w = _pruned(rows, cols, sparsity, seed, torch.bfloat16 if bf16 else torch.float32)  # (out, in)
    cw = ColumnBitmapWeight.from_dense(w)
    assert torch.equal(cw.to_dense(), w) and cw.to_dense().dtype == w.dtype
    assert torch.equal(cw.mask(), w != 0)
    # values channel-major: channel i's kept weights by ascending output
    assert torch.equal(cw.values, w.t()[w.t() != 0])
    # bit j % 64 of word j // 64 of channel i is W[j, i]
    words = cw.bitmap.numpy().view("uint64")
    for i in range(min(cols, 3)):
        for j in range(rows):
            assert bool((int(words[i, j // 64]) >> (j % 64)) & 1) == bool(w[j, i] != 0)
    # block_ptr: kept entries before (channel i, output 512 b)
    nblk = (rows + BLOCK_COLUMNS - 1) // BLOCK_COLUMNS
    keep_t = (w != 0).t()
    expect = [int(keep_t[:i].sum()) + int(keep_t[i, : BLOCK_COLUMNS * b].sum()) for i in range(cols) for b in range(nblk)]
    assert cw.block_ptr.tolist() == expect + [cw.nnz]
    assert cw.nbytes == cw.bitmap.numel() * 8 + cw.values.numel() * cw.values.element_size() + cw.block_ptr.numel() * 8


def test_an_explicit_mask_keeps_explicit_zeros_and_non_finite_values():
    w = torch.tensor([[0.0, float("nan")], [-0.0, float("inf")], [2.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [False, False]])
    cw = ColumnBitmapWeight.from_dense(w, mask)
    assert cw.nnz == 4
    expect = torch.where(mask, w, torch.zeros(()))
    dense = cw.to_dense()
    assert torch.equal(dense.isnan(), expect.isnan()) and torch.equal(dense.nan_to_num(), expect.nan_to_num())
    assert torch.signbit(dense[1, 0])  # -0.0 kept bit for bit


@pytest.mark.parametrize("fmt", ["bitmap", "nm", "csr"])
def test_from_format_equals_from_dense(fmt):
    w = _pruned(64, 32, 0.0)
    w = w * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(8)  # 2:4 along the input
    stored = {"bitmap": BitmapWeight.from_dense, "nm": lambda t: NMWeight.from_dense(t, "2:4"),
              "csr": CSRWeight.from_dense}[fmt](w)
    cw = ColumnBitmapWeight.from_format(stored)
    assert torch.equal(cw.to_dense(), w) and cw.nnz == int((w != 0).sum())


def test_bf16_values_and_bad_dtypes():
    w = _pruned(10, 6, 0.5)
    assert ColumnBitmapWeight.from_dense(w, values_dtype=torch.bfloat16).values.dtype == torch.bfloat16
    assert ColumnBitmapWeight.from_dense(w, values_dtype=torch.int8).values.dtype == torch.int8  # with row scales
    with pytest.raises(ConfigError, match="float32, bfloat16 or int8"):
        ColumnBitmapWeight.from_dense(w, values_dtype=torch.float16)
    with pytest.raises(ConfigError, match="2-D"):
        ColumnBitmapWeight.from_dense(torch.randn(3))


def test_corrupt_buffers_are_model_errors():
    cw = ColumnBitmapWeight.from_dense(_pruned(70, 5, 0.5))
    with pytest.raises(ModelError, match="kept entries"):
        ColumnBitmapWeight(cw.shape, cw.bitmap, cw.values[:-1])
    bad = cw.bitmap.clone()
    bad[0, 1] |= 1 << 10  # output 74 of a 70-output weight
    with pytest.raises(ModelError, match="past output 70"):
        ColumnBitmapWeight(cw.shape, bad, cw.values)
    with pytest.raises(ModelError, match="int64"):
        ColumnBitmapWeight(cw.shape, cw.bitmap.int(), cw.values)


def test_registry_entry_builds_and_loads_without_being_stored():
    spec = registry.get("colbitmap")
    assert spec.cls is ColumnBitmapWeight and not spec.stored and not spec.general and not spec.sparse_linear
    w = _pruned(20, 9, 0.5)
    cw = spec.build(w, None, w != 0)
    again = spec.load(cw.state_dict("l."), cw.shape, None, prefix="l.")
    assert torch.equal(again.to_dense(), w) and torch.equal(again.block_ptr, cw.block_ptr)


def test_docstring_example():
    result = doctest.testmod(colbitmap)
    assert result.attempted > 0 and result.failed == 0
