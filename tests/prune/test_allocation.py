import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparseforge.errors import ConfigError, DataError
from sparseforge.prune.allocation import outlier_ratio, owl_sparsities


def test_outlier_ratio_hand_example():
    # metric |W| * ||X||: one entry 100, seven entries 1 -> mean 13.375; with M=5 only 100 > 66.9
    w = torch.tensor([[100.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert outlier_ratio(w, torch.ones(4), threshold=5.0) == 1 / 8
    assert outlier_ratio(w, torch.ones(4), threshold=20.0) == 0.0
    # the activation norm enters: ||X_1|| = 10 makes column 1 large too (mean 15.625)
    sq = torch.tensor([1.0, 100.0, 1.0, 1.0])
    assert outlier_ratio(w, sq, threshold=2.0) == 1 / 8  # > 31.25: 100 only; the 10s stay below
    assert outlier_ratio(w, sq, threshold=0.3) == 3 / 8  # > 4.69: 100 and both 10s


def test_outlier_ratio_matches_formula():
    g = torch.Generator().manual_seed(0)
    w, sq = torch.randn(16, 32, generator=g), torch.rand(32, generator=g) * 10
    metric = w.abs() * sq.sqrt()
    assert outlier_ratio(w, sq, 2.0) == pytest.approx((metric > 2.0 * metric.mean()).float().mean().item())


def test_block_ratio_pools_the_layers():
    a = torch.tensor([[10.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    # pooled metric: 10, 1, 1, 1, 1, 1 -> mean 2.5, threshold 2 -> 5: one outlier of six
    assert outlier_ratio([a, b], [torch.ones(2), torch.ones(4)], 2.0) == pytest.approx(1 / 6)
    # per layer the 10 is no outlier of its own layer (mean 5.5, threshold 11)
    assert outlier_ratio(a, torch.ones(2), 2.0) == 0.0
    with pytest.raises(DataError):
        outlier_ratio([], [], 5.0)
    with pytest.raises(DataError, match="as many"):
        outlier_ratio([a, b], [torch.ones(2)], 5.0)
    with pytest.raises(ConfigError, match="threshold"):
        outlier_ratio(a, torch.ones(2), 0.0)


def test_owl_hand_example():
    # a = (0, 1, .5), mean .5, dev (-.5, .5, 0): slope = lam / .5
    out = owl_sparsities([0.01, 0.03, 0.02], sparsity=0.7, lam=0.08)
    assert out == pytest.approx([0.78, 0.62, 0.70])


def test_owl_asymmetric_ratios_stay_within_lambda():
    # one outlier-heavy block among many: the reference code's slope would put it at S - 2*lam*(1 - 1/n)
    out = owl_sparsities([0.0] * 9 + [1.0], sparsity=0.5, lam=0.1)
    assert out[-1] == pytest.approx(0.4)
    assert all(s == pytest.approx(0.5 + 0.1 / 9) for s in out[:-1])
    assert math.fsum(out) / 10 == pytest.approx(0.5, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    st.floats(0.1, 0.85),
    st.floats(0.0, 0.1),
)
def test_owl_mean_bounds_and_order(ratios, sparsity, lam):
    out = owl_sparsities(ratios, sparsity, lam)
    assert len(out) == len(ratios)
    assert math.fsum(out) / len(out) == pytest.approx(sparsity, abs=1e-12)
    assert all(sparsity - lam - 1e-12 <= s <= sparsity + lam + 1e-12 for s in out)
    assert all(0.0 <= s < 1.0 for s in out)
    for (r1, s1) in zip(ratios, out):  # more outliers -> lower (or equal) sparsity
        for (r2, s2) in zip(ratios, out):
            if r1 > r2:
                assert s1 <= s2 + 1e-12
    if max(ratios) > min(ratios) and lam > 0:
        assert max(abs(s - sparsity) for s in out) == pytest.approx(lam)


def test_owl_lambda_equal_to_sparsity_reaches_zero_exactly():
    # found by hypothesis: 0.1 - slope * dev gave -1.4e-17 for the block with the most outliers
    out = owl_sparsities([0.0, 0.0, 0.0, 1.0, 0.0625], 0.1, 0.1)
    assert min(out) == 0.0 and out[3] == 0.0
    assert math.fsum(out) / 5 == pytest.approx(0.1, abs=1e-12)


def test_owl_uniform_when_no_spread():
    assert owl_sparsities([0.02, 0.02, 0.02], 0.6, 0.08) == [0.6, 0.6, 0.6]
    assert owl_sparsities([0.01, 0.05], 0.6, 0.0) == [0.6, 0.6]


def test_owl_validation():
    with pytest.raises(ConfigError, match="owl_lambda"):
        owl_sparsities([0.0, 1.0], sparsity=0.95, lam=0.08)  # 0.95 + 0.08 >= 1
    with pytest.raises(ConfigError, match="owl_lambda"):
        owl_sparsities([0.0, 1.0], sparsity=0.05, lam=0.08)  # 0.05 - 0.08 < 0
    with pytest.raises(ConfigError, match="sparsity"):
        owl_sparsities([0.1], sparsity=1.2, lam=0.08)
    with pytest.raises(ConfigError, match="lambda"):
        owl_sparsities([0.1], sparsity=0.5, lam=-0.1)
    with pytest.raises(ConfigError, match="at least one"):
        owl_sparsities([], sparsity=0.5, lam=0.08)
    with pytest.raises(ConfigError, match="finite"):
        owl_sparsities([0.1, float("nan")], sparsity=0.5, lam=0.08)
