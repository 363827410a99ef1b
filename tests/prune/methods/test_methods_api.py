"""The interface the model-level code uses: get_method, LayerStats, prune, for every pattern."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparseforge.errors import ConfigError, DataError, NumericalError
from sparseforge.masks import mask_from_scores, satisfies
from sparseforge.patterns import NM, Block, Channel, FanIn, Unstructured
from sparseforge.prune.methods import METHODS, LayerStats, get_method


def test_registry_and_flags():
    assert set(METHODS) == {"magnitude", "wanda", "sparsegpt"}
    flags = {name: (get_method(name).needs_calibration, get_method(name).needs_hessian) for name in METHODS}
    assert flags == {"magnitude": (False, False), "wanda": (True, False), "sparsegpt": (True, True)}


def test_unknown_method_and_options():
    with pytest.raises(ConfigError, match="magnitude, wanda, sparsegpt"):
        get_method("obs")
    with pytest.raises(ConfigError, match="valid options: blocksize, dampening"):
        get_method("sparsegpt", {"percdamp": 0.01})
    with pytest.raises(ConfigError, match="blocksize"):
        get_method("sparsegpt", {"blocksize": 0})
    with pytest.raises(ConfigError, match="dampening"):
        get_method("sparsegpt", {"dampening": -1.0})
    with pytest.raises(ConfigError, match="mapping"):
        get_method("wanda", ["scope"])
    assert get_method("sparsegpt", {"blocksize": 64}).options.blocksize == 64
    assert get_method("sparsegpt", None).options.dampening == 0.01


def test_layer_stats_match_formulas_across_batches():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 6, generator=g), torch.randn(7, 6, generator=g), torch.randn(1, 1, 3, 6, generator=g)]
    stats = LayerStats(6, hessian=True)
    for b in batches:
        stats.add_batch(b)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()  # (n, in)
    assert stats.num_tokens == x.shape[0] == 20
    torch.testing.assert_close(stats.input_sq_norm, x.pow(2).sum(0).float())
    torch.testing.assert_close(stats.hessian, (2 * x.T @ x / x.shape[0]).float(), rtol=1e-5, atol=1e-6)
    assert stats.hessian.dtype == torch.float32 and stats.input_sq_norm.dtype == torch.float32


def test_layer_stats_accepts_low_precision_and_checks_inputs():
    stats = LayerStats(4)
    stats.add_batch(torch.ones(3, 4, dtype=torch.bfloat16))
    assert stats.input_sq_norm.tolist() == [3.0] * 4
    stats.add_batch(torch.empty(0, 4))  # nothing to add
    assert stats.num_tokens == 3
    with pytest.raises(DataError, match="in_features=4"):
        stats.add_batch(torch.ones(3, 5))
    with pytest.raises(DataError, match="floating-point"):
        stats.add_batch(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(NumericalError):
        stats.add_batch(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ConfigError, match="hessian=True"):
        stats.hessian
    with pytest.raises(DataError, match="no calibration"):
        LayerStats(4).input_sq_norm
    with pytest.raises(ConfigError):
        LayerStats(0)


@st.composite
def case(draw):
    """(pattern, sparsity, rows, cols, blocksize) with shapes the pattern fits."""
    kind = draw(st.sampled_from(["unstructured", "nm", "fanin", "fanin_k", "block", "channel"]))
    rows, cols, col_unit, row_unit = draw(st.integers(1, 5)), draw(st.integers(1, 4)), 1, 1
    sparsity = draw(st.floats(0.0, 0.95))
    if kind == "unstructured":
        pattern = Unstructured()
    elif kind == "nm":
        m = draw(st.sampled_from([2, 4, 8]))
        pattern, sparsity, col_unit = NM(draw(st.integers(1, m - 1)), m), None, m
    elif kind == "fanin":
        pattern = FanIn()
    elif kind == "fanin_k":
        pattern = FanIn(draw(st.integers(1, cols)))
    elif kind == "block":
        pattern = Block(draw(st.integers(1, 2)), draw(st.integers(1, 3)))
        row_unit, col_unit = pattern.h, pattern.w
    else:
        pattern = Channel()
    blocksize = col_unit * draw(st.integers(1, 3))
    return pattern, sparsity, rows * row_unit, cols * col_unit, blocksize


def make_stats(cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * cols + 2, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    if cols > 2:
        x[:, 1] = 0.0  # a dead input now and then
    stats = LayerStats(cols, hessian=True)
    stats.add_batch(x)
    return stats


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@settings(max_examples=40, deadline=None)
@given(c=case(), seed=st.integers(0, 2**31 - 1))
def test_every_method_satisfies_pattern_with_exact_count(name, c, seed):
    pattern, sparsity, rows, cols, blocksize = c
    method = get_method(name, {"blocksize": blocksize} if name == "sparsegpt" else None)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    w_before = w.clone()
    result = method.prune(w, make_stats(cols, seed), pattern, sparsity)
    assert result.mask.dtype == torch.bool and result.mask.shape == w.shape
    assert result.weight.dtype == torch.float32 and result.weight.shape == w.shape
    assert satisfies(result.mask, pattern)
    assert (result.weight[~result.mask] == 0).all()
    assert torch.isfinite(result.weight).all()
    assert torch.equal(w, w_before)
    # the count is fixed by pattern, sparsity, shape and the method's scope: any scores give it
    expected = mask_from_scores(torch.rand(rows, cols), pattern, sparsity, scope=method.scope)
    assert (~result.mask).sum() == (~expected).sum()
    if isinstance(pattern, FanIn):
        assert (result.mask.sum(1) == expected.sum(1)).all()
    assert result.info["achieved_sparsity"] == pytest.approx((~result.mask).float().mean().item())
