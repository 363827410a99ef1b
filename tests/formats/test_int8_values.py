"""int8 values with float32 row scales in the bitmap and N:M formats (sparseforge.formats.quantized)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError, ModelError, NumericalError
from sparseforge.formats import BitmapWeight, NMWeight
from sparseforge.formats.quantized import quantize_rows


def _build(fmt, w, keep=None, **quant):
    if fmt == "bitmap":
        return BitmapWeight.from_dense(w, keep, values_dtype=torch.int8, **quant)
    return NMWeight.from_dense(w, "2:4", keep, values_dtype=torch.int8, **quant)


def _two_four(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    scores = torch.rand(rows, cols // 4, 4, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(2, dim=2).indices, True).reshape(rows, cols)
    return w * keep


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["bitmap", "nm"]), rows=st.integers(1, 12), groups=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_round_to_nearest_is_within_half_a_step(fmt, rows, groups, seed):
    w = _two_four(rows, groups * 4, seed)
    qw = _build(fmt, w)
    assert qw.values.dtype == torch.int8 and qw.scales.dtype == torch.float32 and qw.scales.shape == (rows,)
    deq = qw.to_dense()
    assert deq.dtype == torch.float32
    assert torch.equal(deq != 0, (w != 0) & (deq != 0))  # nothing appears where w was pruned
    err = (deq - w).abs()
    assert bool((err <= qw.scales[:, None] / 2 + 1e-7).all())
    amax = w.abs().amax(dim=1)
    assert torch.allclose(qw.scales[amax > 0], amax[amax > 0] / 127)
    assert int(qw.values.abs().max()) <= 127


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(["bitmap", "nm"]), rows=st.integers(1, 10), groups=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_caller_scales_round_trip_exactly(fmt, rows, groups, seed):
    """Weights already on a grid (what sparseforge.quant leaves: q * scale) are stored as that q."""
    gen = torch.Generator().manual_seed(seed)
    w = _two_four(rows, groups * 4, seed)
    scales = torch.rand(rows, generator=gen) * 0.1 + 1e-3
    q = torch.randint(-127, 128, w.shape, generator=gen).float() * (w != 0)
    on_grid = q * scales[:, None]
    qw = _build(fmt, on_grid, on_grid != 0, scales=scales)
    assert torch.equal(qw.scales, scales)
    assert torch.equal(qw.to_dense(), on_grid)


def test_all_pruned_rows_get_scale_one_and_no_nan():
    w = torch.zeros(3, 8)
    w[1, 2] = 0.5
    for fmt in ("bitmap", "nm"):
        qw = _build(fmt, w)
        assert qw.scales.tolist()[0] == 1.0 and qw.scales.tolist()[2] == 1.0
        assert torch.equal(qw.to_dense(), torch.where(w != 0, w, 0.0))
    # a caller's zero scale is accepted for an all-zero row only
    qw = _build("bitmap", w, scales=torch.tensor([0.0, 0.5 / 127, 0.0]))
    assert qw.scales[0] == 1.0
    with pytest.raises(ConfigError, match=r"scales\[1\] = 0 but row 1 keeps nonzero weights"):
        _build("bitmap", w, scales=torch.tensor([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("bad, match", [
    (torch.ones(2), r"shape \(3,\)"),
    (torch.ones(3, 1), r"shape \(3,\)"),
    (torch.tensor([1.0, float("nan"), 1.0]), r"scales\[1\] = nan"),
    (torch.tensor([1.0, float("inf"), 1.0]), r"scales\[1\] = inf"),
    (torch.tensor([1.0, -1.0, 1.0]), r"scales\[1\] = -1.0"),
    (torch.tensor([1, 1, 1]), "float tensor"),
])
def test_bad_caller_scales_are_config_errors(bad, match):
    w = torch.tensor([[1.0, 0, 2, 0], [0, 3.0, 0, 1], [1.0, 0, 0, 1]])
    for fmt in ("bitmap", "nm"):
        with pytest.raises(ConfigError, match=match):
            _build(fmt, w, scales=bad)


def test_weights_off_the_grid_are_config_errors():
    w = torch.tensor([[1.0, 0, 2.05, 0]])
    with pytest.raises(ConfigError, match=r"weight \[0, 2\] = 2.05 is not on its row's int8 grid"):
        _build("nm", w, scales=torch.tensor([1.0]))
    with pytest.raises(ConfigError, match="not on its row's int8 grid"):  # |q| > 127
        _build("bitmap", w, scales=torch.tensor([0.01]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_numerical_errors(value):
    w = torch.tensor([[1.0, 0, 2.0, 0], [0, 1.0, 0, value]])
    for fmt in ("bitmap", "nm"):
        with pytest.raises(NumericalError, match=r"weight \[1, 3\] is .*needs finite weights"):
            _build(fmt, w)


def test_loaded_buffers_are_checked():
    w = _two_four(4, 8, 0)
    for fmt, prefix in (("bitmap", ""), ("nm", "nm_")):
        qw = _build(fmt, w)
        state = qw.state_dict("l.")
        assert set(state) == {f"l.{prefix}{f}" for f in type(qw).FIELDS} | {f"l.{prefix}scales"}
        load = (lambda s: BitmapWeight.from_state_dict(s, (4, 8), "l.")) if fmt == "bitmap" else \
            (lambda s: NMWeight.from_state_dict(s, (4, 8), "2:4", "l."))
        assert torch.equal(load(state).to_dense(), qw.to_dense())
        for bad, match in ((torch.zeros(4), r"scales\[0\] = 0.0 must be finite and > 0"),
                           (torch.ones(3), r"scales must be float32 of shape \(4,\)"),
                           (torch.ones(4, dtype=torch.float64), "scales must be float32")):
            with pytest.raises(ModelError, match=match):
                load({**state, f"l.{prefix}scales": bad})
        missing = {k: v for k, v in state.items() if not k.endswith("scales")}
        with pytest.raises(ModelError, match="int8 values need float32 scales"):
            load(missing)
        float_state = _build(fmt, w).state_dict("l.")
        float_state[f"l.{prefix}values"] = float_state[f"l.{prefix}values"].float()
        with pytest.raises(ModelError, match="take no scales"):
            load(float_state)


def test_scales_without_int8_is_a_config_error():
    with pytest.raises(ConfigError, match="scales= needs values_dtype=torch.int8"):
        BitmapWeight.from_dense(torch.ones(2, 4), scales=torch.ones(2))


def test_nbytes_counts_one_byte_per_value_plus_scales():
    w = _two_four(8, 64, 1)
    qw = _build("nm", w)
    assert qw.nbytes == 8 * 32 + 8 * 8 + 8 * 4  # values, 2-bit indices, scales


def test_quantize_rows_leaves_pruned_entries_zero():
    w = torch.tensor([[3.0, 100.0, -3.0]])
    q, s = quantize_rows(w, torch.tensor([[True, False, True]]))
    assert q.tolist() == [[127, 0, -127]] and s.tolist() == pytest.approx([3 / 127])
