import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparseforge.errors import DataError, NumericalError
from sparseforge.masks import num_pruned
from sparseforge.prune.methods import LayerStats, get_method, wanda_scores


def stats_from(x: torch.Tensor) -> LayerStats:
    stats = LayerStats(x.shape[-1])
    stats.add_batch(x)
    return stats


def test_scores_formula_hand_example():
    w = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 1.0, 4.0]])
    sq = torch.tensor([4.0, 9.0, 0.0])  # norms 2, 3, 0
    expected = [[2.0, 6.0, 0.0], [6.0, 3.0, 0.0]]
    assert wanda_scores(w, sq).tolist() == expected


def test_scores_match_formula_elementwise():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(5, 7, generator=g), torch.randn(30, 7, generator=g)
    scores = wanda_scores(w, stats_from(x).input_sq_norm)
    for i in range(5):
        for j in range(7):
            ref = abs(w[i, j].item()) * x[:, j].norm().item()
            assert scores[i, j].item() == pytest.approx(ref, rel=1e-5)


def test_activation_norm_changes_the_choice():
    w = torch.ones(2, 2)
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]])  # column 1 has the larger norm
    result = get_method("wanda").prune(w, stats_from(x), "unstructured", 0.5)
    assert result.mask.tolist() == [[False, True], [False, True]]


def test_comparison_is_per_output_row():
    w = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    stats = stats_from(torch.ones(3, 2))
    result = get_method("wanda").prune(w, stats, "unstructured", 0.5)
    assert result.mask.tolist() == [[False, True], [False, True]]  # layer-wise would prune row 0 entirely
    layer = get_method("wanda", {"scope": "layer"}).prune(w, stats, "unstructured", 0.5)
    assert layer.mask.tolist() == [[False, False], [True, True]]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.floats(0.0, 0.95), st.integers(0, 2**31 - 1))
def test_keeps_largest_scores_in_each_row(rows, cols, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(rows, cols, generator=g), torch.randn(10, cols, generator=g) * torch.rand(cols, generator=g)
    stats = stats_from(x)
    result = get_method("wanda").prune(w, stats, "unstructured", sparsity)
    scores = wanda_scores(w, stats.input_sq_norm)
    assert ((~result.mask).sum(1) == num_pruned(sparsity, cols)).all()
    for r in range(rows):
        kept, pruned = scores[r][result.mask[r]], scores[r][~result.mask[r]]
        if kept.numel() and pruned.numel():
            assert kept.min() >= pruned.max()
    assert torch.equal(result.weight, w * result.mask)  # no weight update


def test_needs_calibration_stats():
    method = get_method("wanda")
    assert method.needs_calibration and not method.needs_hessian
    with pytest.raises(DataError, match="calibration"):
        method.prune(torch.randn(2, 4), None, "unstructured", 0.5)
    with pytest.raises(DataError, match="no tokens"):
        method.prune(torch.randn(2, 4), LayerStats(4), "unstructured", 0.5)
    with pytest.raises(DataError, match="in_features"):
        method.prune(torch.randn(2, 4), stats_from(torch.randn(3, 5)), "unstructured", 0.5)


def test_nan_weight_raises():
    with pytest.raises(NumericalError):
        get_method("wanda").prune(torch.full((2, 4), float("nan")), stats_from(torch.randn(3, 4)), "2:4", None)
