import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparseforge.errors import ConfigError, NumericalError
from sparseforge.masks import num_pruned, satisfies
from sparseforge.patterns import NM
from sparseforge.prune.methods import MagnitudePruning, get_method, magnitude_scores


def test_scores_are_absolute_values():
    w = torch.tensor([[1.5, -3.0, 0.0], [-0.25, 2.0, -7.0]])
    assert magnitude_scores(w).tolist() == [[1.5, 3.0, 0.0], [0.25, 2.0, 7.0]]


def test_hand_example_layer_scope():
    w = torch.tensor([[1.0, -4.0], [3.0, 2.0]])
    result = get_method("magnitude").prune(w, None, "unstructured", 0.5)
    assert result.mask.tolist() == [[False, True], [True, False]]
    assert result.weight.tolist() == [[0.0, -4.0], [3.0, 0.0]]
    assert result.info["achieved_sparsity"] == 0.5


def test_row_scope_option_compares_within_rows():
    w = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    assert get_method("magnitude").prune(w, None, "unstructured", 0.5).mask.tolist() == [[False, False], [True, True]]
    row = get_method("magnitude", {"scope": "row"}).prune(w, None, "unstructured", 0.5)
    assert row.mask.tolist() == [[False, True], [False, True]]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.floats(0.0, 0.95), st.integers(0, 2**31 - 1))
def test_keeps_the_largest(rows, cols, sparsity, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    result = MagnitudePruning().prune(w, None, "unstructured", sparsity)
    mask = result.mask
    assert (~mask).sum().item() == num_pruned(sparsity, rows * cols)
    if mask.any() and (~mask).any():
        assert w.abs()[mask].min() >= w.abs()[~mask].max()
    assert torch.equal(result.weight, w * mask)


def test_two_four_keeps_largest_two_per_group():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, 2.0, -1.0, 0.0]])
    result = get_method("magnitude").prune(w, None, NM(2, 4), None)
    assert result.mask.tolist() == [[False, True, True, False, True, True, False, False]]
    assert satisfies(result.mask, "2:4")


def test_input_is_not_modified_and_no_stats_needed():
    w = torch.randn(4, 8)
    before = w.clone()
    get_method("magnitude").prune(w, None, "unstructured", 0.75)
    assert torch.equal(w, before)
    assert get_method("magnitude").needs_calibration is False


def test_nan_weight_raises():
    with pytest.raises(NumericalError, match="NaN"):
        get_method("magnitude").prune(torch.full((2, 4), float("nan")), None, "unstructured", 0.5)


def test_bad_option_lists_valid_ones():
    with pytest.raises(ConfigError, match="scope"):
        get_method("magnitude", {"blocksize": 4})
    with pytest.raises(ConfigError, match="'layer' or 'row'"):
        get_method("magnitude", {"scope": "column"})
