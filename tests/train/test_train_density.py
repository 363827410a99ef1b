import math

import pytest
from hypothesis import given, settings, strategies as st

from sparseforge.errors import ConfigError
from sparseforge.train.density import layer_sparsities, raw_density


def test_uniform():
    assert layer_sparsities({"a": (4, 4), "b": (8, 2)}, 0.7, "uniform") == {"a": 0.7, "b": 0.7}


def test_er_formula_by_hand():
    # densities proportional to (in + out) / (in * out); budget 10% of 10000 + 1000 weights
    sp = layer_sparsities({"a": (100, 100), "b": (10, 100)}, 0.9, "er")
    eps = 1100 / (200 / 10000 * 10000 + 110 / 1000 * 1000)
    assert sp["a"] == pytest.approx(1 - eps * 200 / 10000)
    assert sp["b"] == pytest.approx(1 - eps * 110 / 1000)


def test_er_and_erk_differ_only_with_kernel_dims():
    assert raw_density((30, 20), "er") == raw_density((30, 20), "erk") == pytest.approx(50 / 600)
    assert raw_density((30, 20, 3, 3), "er") == pytest.approx(50 / 600)
    assert raw_density((30, 20, 3, 3), "erk") == pytest.approx(56 / 5400)


def test_over_full_layer_becomes_dense_and_budget_is_kept():
    shapes = {"big": (1000, 1000), "tiny": (2, 3), "mid": (400, 300)}
    sp = layer_sparsities(shapes, 0.9, "erk")
    assert sp["tiny"] == 0.0  # eps * raw would exceed 1
    assert 0.0 < sp["mid"] < sp["big"] < 1.0
    kept = sum((1 - sp[n]) * math.prod(s) for n, s in shapes.items())
    assert kept == pytest.approx(0.1 * sum(math.prod(s) for s in shapes.values()))
    # the rest stay in ER proportion
    ratio = (1 - sp["mid"]) / (1 - sp["big"])
    assert ratio == pytest.approx(raw_density((400, 300), "erk") / raw_density((1000, 1000), "erk"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=6),
       st.floats(0.0, 0.99), st.sampled_from(["er", "erk"]))
def test_erk_keeps_budget_and_bounds(shapes, sparsity, dist):
    shapes = {f"l{i}": s for i, s in enumerate(shapes)}
    sp = layer_sparsities(shapes, sparsity, dist)
    assert all(-1e-9 <= v < 1.0 for v in sp.values())
    total = sum(math.prod(s) for s in shapes.values())
    kept = sum((1 - sp[n]) * math.prod(s) for n, s in shapes.items())
    assert kept == pytest.approx((1 - sparsity) * total, rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("args, match", [
    (({"a": (4, 4)}, 0.5, "random"), "unknown distribution"),
    (({"a": (4, 4)}, 1.0, "erk"), r"\[0, 1\)"),
    (({"a": (4,)}, 0.5, "erk"), "2 positive dimensions"),
])
def test_bad_input(args, match):
    with pytest.raises(ConfigError, match=match):
        layer_sparsities(*args)
