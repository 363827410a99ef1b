"""Format validation runs in bounded chunks (no dense-size temporaries) and still catches corruption anywhere."""

from __future__ import annotations

import pytest
import torch

from sparseforge.errors import ModelError
from sparseforge.formats import BitmapWeight, NMWeight
from sparseforge.formats import bitmap as bitmap_mod
from sparseforge.formats import nm as nm_mod


def _nm(rows=9, cols=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w.view(rows, cols // 4, 4)[..., 2:] = 0  # 2:4
    return NMWeight.from_dense(w, "2:4")


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_nm_validation_catches_corruption_in_any_chunk(monkeypatch, chunk):
    monkeypatch.setattr(nm_mod, "_VALIDATE_CHUNK", chunk)
    good = _nm()
    NMWeight(good.shape, good.pattern, good.values, good.indices)  # valid: no error
    for row in (0, 4, 8):
        bad = good.indices.clone()
        bad[row, 0] = 0b0101  # positions (1, 1): not strictly ascending
        with pytest.raises(ModelError, match="not strictly ascending"):
            NMWeight(good.shape, good.pattern, good.values, bad)
    odd = _nm(rows=5, cols=4)  # k = 2 positions x 2 bits: 4 padding bits in the only index byte
    bad = odd.indices.clone()
    bad[3, -1] |= 0b1000_0000
    with pytest.raises(ModelError, match="padding bits"):
        NMWeight(odd.shape, odd.pattern, odd.values, bad)


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_bitmap_row_counts_and_padding_check(monkeypatch, chunk):
    monkeypatch.setattr(bitmap_mod, "_POPCOUNT_CHUNK", chunk)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(11, 13, generator=g) * (torch.rand(11, 13, generator=g) < 0.4)
    bw = BitmapWeight.from_dense(w)
    assert torch.equal(bw.row_offsets[1:] - bw.row_offsets[:-1], (w != 0).sum(1))
    assert torch.equal(bitmap_mod.row_popcounts(bw.bitmap), (w != 0).sum(1))
    bad = bw.bitmap.clone()
    bad[6, -1] |= 0b1000_0000  # column 15 of a 13-column row
    with pytest.raises(ModelError, match="padding bits"):
        BitmapWeight(bw.shape, bad, bw.values)
