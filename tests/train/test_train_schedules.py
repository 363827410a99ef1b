import math

import pytest
from hypothesis import given, strategies as st

from sparseforge.errors import ConfigError
from sparseforge.train.schedules import Schedule, constant_drop_fraction, cosine_drop_fraction, cubic_sparsity


def test_cubic_matches_zhu_gupta_formula():
    s = Schedule(start_step=100, end_step=500, update_interval=100)  # n = 4 pruning steps after t0
    si, sf = 0.1, 0.9
    for t in range(100, 501, 100):
        expected = sf + (si - sf) * (1 - (t - 100) / (4 * 100)) ** 3
        assert cubic_sparsity(t, s, si, sf) == pytest.approx(expected, abs=1e-12)
    assert cubic_sparsity(0, s, si, sf) == si
    assert cubic_sparsity(100, s, si, sf) == si
    assert cubic_sparsity(500, s, si, sf) == sf
    assert cubic_sparsity(10_000, s, si, sf) == sf
    assert cubic_sparsity(300, s, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 0.125)


@given(st.integers(0, 50), st.integers(1, 20), st.integers(1, 10), st.floats(0, 0.5), st.floats(0.5, 0.99))
def test_cubic_is_monotone_and_bounded(start, interval, n, si, sf):
    s = Schedule(start_step=start, end_step=start + n * interval, update_interval=interval)
    values = [cubic_sparsity(t, s, si, sf) for t in range(0, start + n * interval + 3)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert min(values) >= si - 1e-12 and max(values) <= sf + 1e-12


def test_cosine_drop_fraction():
    s = Schedule(start_step=0, end_step=1000, update_interval=100)
    for t in (0, 100, 250, 999):
        assert cosine_drop_fraction(t, s, 0.3) == pytest.approx(0.15 * (1 + math.cos(math.pi * t / 1000)))
    assert cosine_drop_fraction(1000, s, 0.3) == pytest.approx(0.0)
    assert cosine_drop_fraction(5000, s, 0.3) == pytest.approx(0.0)
    shifted = Schedule(start_step=200, end_step=1200, update_interval=100)
    assert cosine_drop_fraction(200, shifted, 0.3) == pytest.approx(0.3)  # measured from the start
    assert constant_drop_fraction(999, s, 0.3) == 0.3 and constant_drop_fraction(1000, s, 0.3) == 0.0


def test_update_steps():
    s = Schedule(start_step=0, end_step=300, update_interval=100)
    assert [t for t in range(0, 400) if s.is_dst_step(t)] == [100, 200]  # t < T_end, t >= 1
    assert [t for t in range(0, 400) if s.is_gradual_step(t)] == [100, 200, 300]
    late = Schedule(start_step=50, end_step=250, update_interval=100)
    assert [t for t in range(0, 400) if late.is_gradual_step(t)] == [50, 150, 250]
    assert [t for t in range(0, 400) if late.is_dst_step(t)] == [50, 150]


@pytest.mark.parametrize("kwargs, match", [
    (dict(start_step=100, end_step=50), "ends before it starts"),
    (dict(start_step=100, end_step=100), "ends before it starts"),
    (dict(update_interval=0, end_step=10), "update_interval"),
    (dict(update_interval=-5, end_step=10), "update_interval"),
    (dict(start_step=-1, end_step=10), "start_step"),
    (dict(end_step=0), "end_step"),
    (dict(end_step=10.5), "end_step"),
    (dict(update_interval=True, end_step=10), "update_interval"),
])
def test_bad_schedules(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Schedule(**kwargs)


def test_schedule_checks():
    with pytest.raises(ConfigError, match="multiple of update_interval"):
        Schedule(start_step=0, end_step=250, update_interval=100).check_gradual()
    with pytest.raises(ConfigError, match="no mask update"):
        Schedule(start_step=0, end_step=100, update_interval=100).check_dst()
    with pytest.raises(ConfigError, match="needs schedule.end_step"):
        Schedule().check_dst()
    Schedule(start_step=0, end_step=101, update_interval=100).check_dst()
