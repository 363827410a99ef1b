"""The symmetric integer grid: round trips, grid membership, zero rows, groups and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError, DataError, NumericalError
from sparseforge.quant import SCALE_BUFFER, QuantConfig, parse_quantize
from sparseforge.quant.grid import codes_of, compute_scale, dequantize, expand_scale, fake_quantize, quantize


def weights(seed: int, rows: int, cols: int, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * spread


shapes = st.tuples(st.integers(1, 6), st.sampled_from([4, 8, 16]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), shape=shapes, bits=st.sampled_from([8, 4]),
       spread=st.floats(1e-6, 1e3), grouped=st.booleans())
def test_round_trip_error_is_at_most_half_a_step(seed, shape, bits, spread, grouped):
    w = weights(seed, *shape, spread)
    group = 4 if grouped else None
    scale = compute_scale(w, bits, group)
    codes = quantize(w, scale, bits, group)
    back = dequantize(codes, scale, group)
    step = expand_scale(scale, tuple(w.shape), group)  # (out, 1) or (out, in)
    assert codes.dtype == torch.int8
    assert int(codes.abs().max()) <= 2 ** (bits - 1) - 1
    assert torch.all((back - w).abs() <= step / 2 * (1 + 1e-5) + 1e-30)  # scale from max|w|: no clipping


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), shape=shapes, bits=st.sampled_from([8, 4]), zero_frac=st.floats(0, 1))
def test_dequantized_weights_are_exact_products_and_keep_zeros(seed, shape, bits, zero_frac):
    w = weights(seed, *shape, 1.0)
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) < zero_frac] = 0.0
    deq, scale = fake_quantize(w, bits)
    codes = codes_of(deq, scale, bits)  # raises unless deq == codes * scale bit for bit
    assert torch.equal(codes.float() * scale[:, None], deq)
    assert torch.all(deq[w == 0] == 0) and not torch.signbit(deq[deq == 0]).any()  # +0.0, mask kept
    assert torch.isfinite(deq).all() and scale.dtype == torch.float32


def test_all_zero_rows_get_scale_zero_and_no_nan():
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    deq, scale = fake_quantize(w, 8)
    assert scale[0] == 0 and scale[2] == 0 and scale[1] > 0
    assert torch.isfinite(deq).all() and torch.all(deq[0] == 0) and torch.all(deq[2] == 0)
    deq_g, scale_g = fake_quantize(w, 4, group_size=4)
    assert tuple(scale_g.shape) == (3, 2) and torch.isfinite(deq_g).all() and torch.all(scale_g[0] == 0)


def test_groups_scale_each_block_of_columns_independently():
    w = torch.ones(2, 8)
    w[:, 4:] = 100.0  # a large second group must not coarsen the first
    deq, scale = fake_quantize(w, 4, group_size=4)
    assert torch.equal(deq, w)
    assert scale[0, 0] == pytest.approx(1 / 7) and scale[0, 1] == pytest.approx(100 / 7)
    per_channel, _ = fake_quantize(w, 4)
    assert not torch.equal(per_channel, w)  # one scale per row does lose the small group


def test_bad_input_is_a_clear_error():
    with pytest.raises(NumericalError, match="NaN or inf"):
        compute_scale(torch.tensor([[1.0, float("nan")]]), 8)
    with pytest.raises(NumericalError, match="NaN or inf"):
        fake_quantize(torch.tensor([[1.0, float("inf")]]), 4)
    with pytest.raises(DataError, match="does not divide"):
        compute_scale(torch.ones(2, 6), 8, group_size=4)
    with pytest.raises(DataError, match="needs"):
        quantize(torch.ones(2, 8), torch.ones(3), 8)
    with pytest.raises(DataError, match="2-D"):
        compute_scale(torch.ones(8), 8)
    deq, scale = fake_quantize(weights(0, 4, 8, 1.0), 8)
    deq[1, 2] += scale[1] / 3  # off the grid
    with pytest.raises(DataError, match="not on the int8 grid"):
        codes_of(deq, scale, 8)
    with pytest.raises(DataError, match="not on the int8 grid"):
        codes_of(fake_quantize(weights(1, 4, 8, 1.0), 8)[0], scale, 8)  # another layer's scales


def test_config_validation_and_parsing():
    assert SCALE_BUFFER == "weight_scale"
    assert parse_quantize("int4", "joint", 32) == QuantConfig(bits=4, group_size=32, method="joint")
    assert QuantConfig().qmax == 127 and QuantConfig(bits=4).qmax == 7
    for bad in (dict(bits=3), dict(bits=True), dict(group_size=0), dict(method="gptq")):
        with pytest.raises(ConfigError):
            QuantConfig(**bad)
    with pytest.raises(ConfigError, match="int8 or int4"):
        parse_quantize("fp8")


def test_module_examples_run():
    import doctest

    from sparseforge.quant import config, grid, transform

    for module in (config, grid, transform):
        assert doctest.testmod(module).failed == 0, module.__name__
