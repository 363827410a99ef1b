"""NMWeight: hand-computed index bytes, property round trips, pattern violations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats import NMWeight
from sparseforge.formats.nm import index_bits
from sparseforge.masks import mask_from_scores, satisfies
from sparseforge.patterns import NM

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def reference(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype))


def test_index_bits():
    assert [index_bits(m) for m in (2, 3, 4, 5, 8, 9, 16, 32)] == [1, 2, 2, 3, 3, 4, 4, 5]


def test_2_4_hand_computed():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0], [5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0]])
    nw = NMWeight.from_dense(w, NM(2, 4))
    # row 0 positions [1, 3 | 0, 2] -> 1 | 3<<2 | 0<<4 | 2<<6 = 0x8D
    # row 1 positions [0, 1 | 0, 3] (group 1 padded with position 0) -> 0 | 1<<2 | 0<<4 | 3<<6 = 0xC4
    assert nw.indices.dtype == torch.uint8
    assert nw.indices.tolist() == [[0x8D], [0xC4]]
    assert nw.values.tolist() == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 7.0]]
    assert nw.nnz == 8 and nw.nbytes == 8 * 4 + 2
    assert torch.equal(nw.to_dense(), w)


def test_1_8_crosses_byte_boundary():
    w = torch.zeros(1, 24)
    w[0, 6], w[0, 8 + 1], w[0, 16 + 4] = 1.0, 2.0, 3.0  # positions [6, 1, 4], 3 bits each (not palindromes)
    nw = NMWeight.from_dense(w, "1:8")
    value = 6 | 1 << 3 | 4 << 6  # 9-bit stream 0x10E -> bytes [0x0E, 0x01] (7 padding bits = 0)
    assert nw.indices.tolist() == [[value & 0xFF, value >> 8]] == [[0x0E, 0x01]]
    assert nw.values.tolist() == [[1.0, 2.0, 3.0]]


def test_padding_uses_lowest_unused_positions():
    w = torch.zeros(1, 8)
    w[0, 6] = 9.0  # 4:8 group with one kept entry -> positions 0, 1, 2 padded, then 6
    nw = NMWeight.from_dense(w, "4:8")
    assert nw.positions().tolist() == [[0, 1, 2, 6]]
    assert nw.values.tolist() == [[0.0, 0.0, 0.0, 9.0]]
    assert bits(nw.values[:, :3]).eq(0).all()  # padding is +0.0


@st.composite
def nm_case(draw):
    m = draw(st.sampled_from([2, 3, 4, 5, 8, 16]))
    n = draw(st.integers(1, m - 1))
    rows = draw(st.integers(1, 7))
    cols = m * draw(st.integers(1, 5))
    w = draw(hnp.arrays(np.float32, (rows, cols), elements=st.floats(width=32)))
    scores = draw(hnp.arrays(np.float32, (rows, cols), elements=st.floats(0, 1, width=32)))
    mask = mask_from_scores(torch.from_numpy(scores), NM(n, m))
    drop = draw(st.sampled_from(["none", "some", "all", "rows"]))
    if drop == "some":  # groups with fewer than n kept
        mask &= torch.from_numpy(draw(hnp.arrays(np.bool_, (rows, cols))))
    elif drop == "all":
        mask[:] = False
    elif drop == "rows":
        mask[::2] = False
    return NM(n, m), torch.from_numpy(w.copy()), mask, draw(st.booleans())


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=60, deadline=None)
@given(case=nm_case())
def test_round_trip_bit_exact(dtype, case):
    pattern, w, mask, implicit = case
    w = w.to(dtype)
    if implicit:  # mask None: the nonzeros of an already-pruned weight
        w = reference(w, mask)
        mask = w != 0
        nw = NMWeight.from_dense(w, pattern)
    else:
        nw = NMWeight.from_dense(w, pattern, mask)
    rows, cols = w.shape
    assert nw.values.shape == (rows, cols // pattern.m * pattern.n) and nw.values.dtype == dtype
    assert nw.indices.shape == (rows, (cols // pattern.m * pattern.n * index_bits(pattern.m) + 7) // 8)
    assert torch.equal(bits(nw.to_dense()), bits(reference(w, mask)))
    if torch.isfinite(w).all():
        assert torch.equal(nw.to_dense(), w * mask)
    stored = nw.mask()
    assert (stored.reshape(-1, pattern.m).sum(1) == pattern.n).all()  # exactly n per group
    assert (stored | ~mask).all()  # every kept entry is stored
    assert satisfies(stored, pattern)
    again = NMWeight.from_state_dict(nw.state_dict("p."), nw.shape, str(pattern), "p.")
    assert torch.equal(bits(again.to_dense()), bits(nw.to_dense()))


def test_violation_names_row_and_group():
    w = torch.ones(3, 8)
    w[0] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    w[1] = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # group 1 keeps 3
    with pytest.raises(ConfigError, match=r"row 1, group 1 \(columns 4..7\) keeps 3 > 2"):
        NMWeight.from_dense(w, "2:4")
    with pytest.raises(ConfigError, match="divisible by 4"):
        NMWeight.from_dense(torch.zeros(2, 6), "2:4")
    with pytest.raises(ConfigError, match="N:M pattern"):
        NMWeight.from_dense(torch.zeros(2, 8), "unstructured")
    with pytest.raises(ConfigError, match="row 0, group 0"):
        NMWeight.from_dense(torch.zeros(1, 4), "1:4", torch.tensor([[True, True, False, False]]))


def test_all_zero():
    nw = NMWeight.from_dense(torch.zeros(2, 8, dtype=torch.float16), "2:4")
    assert nw.positions().tolist() == [[0, 1, 0, 1]] * 2
    assert torch.equal(nw.to_dense(), torch.zeros(2, 8, dtype=torch.float16))


def test_corrupt_buffers_rejected():
    nw = NMWeight.from_dense(torch.tensor([[0.0, 1.0, 0.0, 2.0]]), "2:4")
    with pytest.raises(ModelError, match="ascending"):
        NMWeight((1, 4), NM(2, 4), nw.values, torch.tensor([[0b0101]], dtype=torch.uint8))  # positions 1, 1
    with pytest.raises(ModelError, match="padding bits"):
        NMWeight((1, 4), NM(2, 4), nw.values, nw.indices | 0x10)
    with pytest.raises(ModelError, match="values must be"):
        NMWeight((1, 4), NM(2, 4), nw.values[:, :1], nw.indices)
    with pytest.raises(ModelError, match="missing"):
        NMWeight.from_state_dict({"nm_values": nw.values}, (1, 4), "2:4")
