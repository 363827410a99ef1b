import importlib
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparseforge.errors import ConfigError, NumericalError
from sparseforge.masks import mask_from_scores, num_pruned, satisfies
from sparseforge.patterns import NM, Block, Channel, FanIn, Unstructured

sparsities = st.floats(0.0, 0.99, allow_nan=False)


def scores_strategy(rows, cols, ties):
    # few distinct values when ties=True so that tie-breaking is exercised
    values = st.integers(0, 3).map(float) if ties else st.floats(-1e3, 1e3, allow_nan=False, width=32)
    return st.lists(values, min_size=rows * cols, max_size=rows * cols).map(lambda v: torch.tensor(v).reshape(rows, cols))


@st.composite
def matrix(draw, row_mult=1, col_mult=1):
    rows = draw(st.integers(1, 6)) * row_mult
    cols = draw(st.integers(1, 6)) * col_mult
    return draw(scores_strategy(rows, cols, draw(st.booleans())))


@given(matrix(), sparsities, st.sampled_from(["layer", "row"]))
def test_unstructured_exact_count(scores, sparsity, scope):
    mask = mask_from_scores(scores, Unstructured(), sparsity, scope=scope)
    rows, cols = scores.shape
    if scope == "layer":
        assert (~mask).sum().item() == num_pruned(sparsity, rows * cols)
    else:
        assert ((~mask).sum(1) == num_pruned(sparsity, cols)).all()


@given(matrix(), sparsities)
def test_unstructured_keeps_the_largest(scores, sparsity):
    mask = mask_from_scores(scores, Unstructured(), sparsity)
    if mask.any() and (~mask).any():
        assert scores[mask].min() >= scores[~mask].max()


@given(st.integers(1, 8).flatmap(lambda m: st.tuples(st.integers(1, m), st.just(m + 1))), st.data())
def test_nm_keeps_exactly_n_of_every_m(nm, data):
    n, m = nm
    scores = data.draw(matrix(col_mult=m))
    mask = mask_from_scores(scores, NM(n, m))
    groups = mask.reshape(-1, m)
    assert (groups.sum(1) == n).all()
    assert satisfies(mask, NM(n, m))
    # within each group the kept scores dominate the pruned ones
    g = scores.reshape(-1, m)
    kept_min = torch.where(groups, g, torch.inf).min(1).values
    pruned_max = torch.where(~groups, g, -torch.inf).max(1).values
    assert (kept_min >= pruned_max).all()


@given(matrix(), sparsities)
def test_fanin_constant_per_row(scores, sparsity):
    mask = mask_from_scores(scores, FanIn(), sparsity)
    cols = scores.shape[1]
    assert (mask.sum(1) == cols - num_pruned(sparsity, cols)).all()
    assert satisfies(mask, FanIn())


@given(matrix(), sparsities)
def test_channel_prunes_whole_rows(scores, sparsity):
    mask = mask_from_scores(scores, Channel(), sparsity)
    assert satisfies(mask, Channel())
    assert (~mask.all(1)).sum() == num_pruned(sparsity, scores.shape[0])


@given(st.integers(1, 3), st.integers(1, 3), st.data(), sparsities)
def test_block_tiles_uniform_and_exact(h, w, data, sparsity):
    scores = data.draw(matrix(row_mult=h, col_mult=w))
    mask = mask_from_scores(scores, Block(h, w), sparsity)
    assert satisfies(mask, Block(h, w))
    tiles = scores.numel() // (h * w)
    assert (~mask).sum().item() == num_pruned(sparsity, tiles) * h * w


def test_ties_keep_lower_index():
    scores = torch.ones(2, 8)
    mask = mask_from_scores(scores, Unstructured(), 0.5)
    assert mask.flatten().tolist() == [True] * 8 + [False] * 8
    mask = mask_from_scores(scores, NM(2, 4))
    assert mask[0].tolist() == [True, True, False, False] * 2
    mask = mask_from_scores(scores, Unstructured(), 0.5, scope="row")
    assert mask.tolist() == [[True] * 4 + [False] * 4] * 2


def test_deterministic_across_calls():
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (64, 64)).float()
    a = mask_from_scores(scores, Unstructured(), 0.7)
    b = mask_from_scores(scores.clone(), Unstructured(), 0.7)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_bad_sparsity(bad):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        mask_from_scores(torch.rand(4, 4), Unstructured(), bad)


def test_nm_conflicting_sparsity():
    with pytest.raises(ConfigError, match="fixes sparsity"):
        mask_from_scores(torch.rand(4, 8), NM(2, 4), 0.7)
    assert mask_from_scores(torch.rand(4, 8), NM(2, 4), 0.5).sum() == 16


def test_non_finite_scores():
    s = torch.rand(4, 4)
    s[1, 1] = math.nan
    with pytest.raises(NumericalError):
        mask_from_scores(s, Unstructured(), 0.5)


def test_pattern_must_fit():
    with pytest.raises(ConfigError, match="divisible"):
        mask_from_scores(torch.rand(4, 6), "2:4")


def test_satisfies_detects_violations():
    m = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert not satisfies(m, NM(2, 4))
    assert satisfies(m, NM(3, 4))
    assert not satisfies(torch.tensor([[1, 0], [1, 1]]), FanIn())
    assert not satisfies(torch.tensor([[1, 0], [1, 1]]), Channel())
    assert not satisfies(torch.tensor([[1, 0], [1, 1]]), Block(2, 2))


# -- transposable N:M ------------------------------------------------------------------------------
from sparseforge.masks import transposable_mask  # noqa: E402


def _circulant_baseline(scores, n, m):
    """Documented baseline: per M x M block, the best of the M circulant masks (row i keeps columns
    i+k, ..., i+k+N-1 mod M for a shift k), each exactly N per row and per column."""
    rows, cols = scores.shape
    out = torch.zeros(rows, cols, dtype=torch.bool)
    shifts = []
    for k in range(m):
        c = torch.zeros(m, m, dtype=torch.bool)
        for i in range(m):
            for d in range(n):
                c[i, (i + k + d) % m] = True
        shifts.append(c)
    for bi in range(0, rows, m):
        for bj in range(0, cols, m):
            block = scores[bi:bi + m, bj:bj + m].double()
            best = max(shifts, key=lambda c: float(block[c].sum()))
            out[bi:bi + m, bj:bj + m] = best
    return out


@st.composite
def square_blocks(draw, m):
    rows = draw(st.integers(1, 3)) * m
    cols = draw(st.integers(1, 3)) * m
    return draw(scores_strategy(rows, cols, draw(st.booleans()))).abs()


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(2, 4), (1, 4), (3, 4), (1, 2)]), st.data())
def test_transposable_is_nm_both_ways_and_beats_the_circulant_baseline(nm, data):
    n, m = nm
    scores = data.draw(square_blocks(m))
    mask = transposable_mask(scores, NM(n, m))
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    # exactly N per group of M along the inputs (W) and along the outputs (W^T)
    assert (mask.reshape(-1, m).sum(1) == n).all()
    assert (mask.t().reshape(-1, m).sum(1) == n).all()
    assert satisfies(mask, NM(n, m)) and satisfies(mask.t(), NM(n, m))
    kept = scores[mask].double().sum()
    base = _circulant_baseline(scores, n, m)
    assert (base.reshape(-1, m).sum(1) == n).all() and (base.t().reshape(-1, m).sum(1) == n).all()
    assert kept >= scores[base].double().sum() - 1e-6 * max(1.0, float(kept))
    # and never more than the unconstrained row-wise N:M mask (an upper bound)
    assert kept <= scores[mask_from_scores(scores, NM(n, m))].double().sum() + 1e-6 * max(1.0, float(kept))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False, width=32), min_size=16, max_size=16))
def test_transposable_1_4_is_the_optimal_assignment(values):
    # 1:4 transposable on a 4x4 block = a permutation matrix: the optimum is the assignment problem
    scipy_opt = importlib.import_module("scipy.optimize")
    block = torch.tensor(values).reshape(4, 4)
    mask = transposable_mask(block, "1:4")
    r, c = scipy_opt.linear_sum_assignment(block.double().numpy(), maximize=True)
    assert float(block[mask].double().sum()) == pytest.approx(float(block.double().numpy()[r, c].sum()), rel=1e-6)


def test_transposable_hand_example_and_pattern_count():
    from sparseforge.masks import _block_patterns

    # the candidates are exactly the 4x4 0/1 matrices with N ones per row and column (brute force over 2^16)
    every = torch.tensor([[(b >> (15 - i)) & 1 for i in range(16)] for b in range(1 << 16)]).reshape(-1, 4, 4)
    for n, count in ((2, 90), (1, 24), (3, 24)):  # 90: the patterns of Hu et al.'s convolution kernel
        ok = every[((every.sum(2) == n).all(1)) & ((every.sum(1) == n).all(1))].reshape(-1, 16)
        mine = _block_patterns(n, 4)
        assert len(mine) == len(ok) == count
        assert {tuple(r) for r in mine.int().tolist()} == {tuple(r) for r in ok.tolist()}
    s = torch.tensor([[9., 8, 1, 0], [7, 6, 0, 1], [5, 4, 1, 0], [0, 1, 2, 3]])
    assert not satisfies(mask_from_scores(s, "2:4").t(), "2:4")
    assert transposable_mask(s, "2:4").int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    # exact: 9+8+7+6 + 1+0+2+3 = 36, the best of the 90 candidates
    assert float(s[transposable_mask(s, "2:4")].sum()) == 36.0


def test_transposable_bad_input():
    with pytest.raises(ConfigError, match="both dimensions divisible by M=4"):
        transposable_mask(torch.rand(6, 8), "2:4")
    with pytest.raises(ConfigError, match="not N:M"):
        transposable_mask(torch.rand(4, 4), "unstructured")
    with pytest.raises(ConfigError, match="too many"):
        transposable_mask(torch.rand(8, 8), "4:8")
    s = torch.rand(4, 4)
    s[0, 0] = math.nan
    with pytest.raises(NumericalError):
        transposable_mask(s, "2:4")


def _sorted_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: a stable descending sort, the first k of each row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k], True)
    return mask


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2), st.integers(0, 10_000), st.sampled_from([2, 5, 1000]))
def test_long_rows_select_the_same_mask_as_the_stable_sort(groups, extra, seed, distinct):
    """Rows past SELECT_MIN_LENGTH take the k-th-value selection: the same mask as the sort, ties included
    (few distinct values, signed zeros), for every k from 1 to L - 1."""
    from sparseforge.masks import SELECT_MIN_LENGTH, topk_mask

    gen = torch.Generator().manual_seed(seed)
    length = SELECT_MIN_LENGTH + extra * 37
    scores = torch.randint(-distinct, distinct, (groups, length), generator=gen).float() / 3
    scores[scores == 0] = torch.tensor([0.0, -0.0])[torch.randint(0, 2, ((scores == 0).sum().item(),), generator=gen)]
    for k in (1, int(torch.randint(2, length - 1, (1,), generator=gen)), length - 1):
        got = topk_mask(scores, k)
        assert torch.equal(got, _sorted_topk(scores, k)), k
        assert (got.sum(dim=1) == k).all()


def test_long_rows_with_a_nan_or_inf_fall_back_to_the_sort():
    from sparseforge.masks import SELECT_MIN_LENGTH, topk_mask

    scores = torch.rand(2, SELECT_MIN_LENGTH)
    scores[0, 5], scores[1, 7] = float("nan"), float("inf")
    assert torch.equal(topk_mask(scores, 100), _sorted_topk(scores, 100))
