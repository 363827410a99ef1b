import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparseforge.errors import ConfigError
from sparseforge.masks import num_pruned, satisfies
from sparseforge.patterns import Block, Channel, FanIn, Unstructured
from sparseforge.train.updates import drop_and_grow, prune_mask, random_mask, unit_layout


def test_rigl_hand_example_grows_top_gradient_among_not_kept():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    w = torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.2, 0.0, 0.9, 0.0]])
    g = torch.tensor([[0.0, 0.3, 0.8, 0.1], [5.0, 0.2, 0.0, 0.7]])
    out = drop_and_grow(mask, w.abs(), g.abs(), "unstructured", drop_fraction=0.5)  # k = 2 of 4
    # drop the two smallest |w| among active: (0,1)=0.1 and (1,0)=0.2
    assert out.kept.int().tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]
    # grow the two largest |g| among the not-kept: (1,0)=5.0 (just dropped, comes back) and (0,2)=0.8
    assert out.grown.int().tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
    assert out.mask.int().tolist() == [[1, 0, 1, 0], [1, 0, 1, 0]]
    assert out.units == 2


def test_zero_drop_fraction_and_floor():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    s = torch.rand(1, 4)
    assert drop_and_grow(mask, s, s, "unstructured", 0.3).units == 0  # floor(0.9) = 0
    assert torch.equal(drop_and_grow(mask, s, s, "unstructured", 0.0).mask, mask)
    with pytest.raises(ConfigError, match="drop fraction"):
        drop_and_grow(mask, s, s, "unstructured", 1.0)


PATTERNS = [Unstructured(), FanIn(), Block(2, 4), Channel()]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(PATTERNS), st.integers(1, 4), st.integers(1, 4), st.floats(0.0, 0.95),
       st.floats(0.0, 0.99), st.integers(0, 2**31 - 1))
def test_drop_and_grow_invariants(pattern, r, c, sparsity, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (4 * r, 8 * c)
    mask = random_mask(shape, pattern, sparsity, g)
    drop, grow = torch.randn(shape, generator=g).abs(), torch.randn(shape, generator=g)
    drop = drop.round(decimals=1)  # ties: tie-breaking must still give exact counts
    out = drop_and_grow(mask, drop, grow, pattern, fraction)
    groups, length, unit = unit_layout(pattern, shape)
    active = int(mask.sum()) // (groups * unit)
    k = math.floor(fraction * active + 1e-9)
    assert out.units == k
    assert int(out.mask.sum()) == int(mask.sum())  # parameter count constant
    assert not (out.kept & ~mask).any()  # drop only removes
    assert int((mask & ~out.kept).sum()) == k * groups * unit  # exactly k units dropped
    assert not (out.grown & out.kept).any() and int(out.grown.sum()) == k * groups * unit
    dropped, added = mask & ~out.mask, out.mask & ~mask  # realised change: disjoint, same size
    assert not (dropped & added).any() and int(dropped.sum()) == int(added.sum()) <= k * groups * unit
    assert satisfies(out.mask, pattern)
    if isinstance(pattern, FanIn):
        assert out.mask.sum(1).tolist() == mask.sum(1).tolist()
    # dropped entries had the smallest drop scores among the active ones
    if k and isinstance(pattern, Unstructured):
        assert drop[mask & ~out.kept].max() <= drop[out.kept].min()
        rest = ~out.kept & ~out.grown
        if rest.any():
            assert grow[out.grown].min() >= grow[rest].max()


def test_fanin_drops_and_grows_per_row():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    w = torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.0, 0.8, 0.2, 0.0]])
    g = torch.tensor([[0.0, 0.0, 0.1, 0.5], [0.9, 0.0, 0.0, 0.1]])
    out = drop_and_grow(mask, w, g, FanIn(2), 0.5)  # FanIn(k) keeps its k per row
    assert out.mask.int().tolist() == [[0, 1, 0, 1], [1, 1, 0, 0]]


def test_block_moves_whole_tiles():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :4] = True
    w = torch.zeros(2, 8)
    w[:, :2], w[:, 2:4] = 1.0, 0.1  # tile scores: 4.0 and 0.4
    g = torch.zeros(2, 8)
    g[:, 6:] = 1.0
    out = drop_and_grow(mask, w, g, Block(2, 2), 0.5)
    assert out.mask.int().tolist() == [[1, 1, 0, 0, 0, 0, 1, 1]] * 2


def test_nm_is_rejected_for_dynamic_updates():
    with pytest.raises(ConfigError, match="N:M"):
        drop_and_grow(torch.ones(2, 4, dtype=torch.bool), torch.rand(2, 4), torch.rand(2, 4), "2:4", 0.5)
    with pytest.raises(ConfigError, match="N:M"):
        prune_mask(torch.ones(2, 4, dtype=torch.bool), torch.rand(2, 4), "2:4", 0.5)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(PATTERNS), st.floats(0.0, 0.5), st.floats(0.0, 0.45), st.integers(0, 1000))
def test_prune_mask_is_nested_and_exact(pattern, s1, ds, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (8, 16)
    w = torch.randn(shape, generator=g).abs()
    m1 = prune_mask(torch.ones(shape, dtype=torch.bool), w, pattern, s1)
    m2 = prune_mask(m1, w, pattern, s1 + ds)
    assert not (m2 & ~m1).any()
    groups, length, unit = unit_layout(FanIn() if isinstance(pattern, FanIn) else pattern, shape)
    assert int((~m2).sum()) == num_pruned(s1 + ds, length) * groups * unit


def test_prune_mask_never_regrows():
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    with pytest.raises(ConfigError, match="must not decrease"):
        prune_mask(mask, torch.ones(1, 4), "unstructured", 0.25)


def test_random_mask_is_seeded_and_exact():
    a = random_mask((16, 16), "unstructured", 0.9, torch.Generator().manual_seed(1))
    b = random_mask((16, 16), "unstructured", 0.9, torch.Generator().manual_seed(1))
    c = random_mask((16, 16), "unstructured", 0.9, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int((~a).sum()) == num_pruned(0.9, 256)
