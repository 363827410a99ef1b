"""Every native kernel against its scalar reference and against dense torch on the masked weight.

Each ISA path is forced through SPARSEFORGE_ISA (the variable is read on every call); paths this
CPU lacks are skipped. Both algorithms (row streaming, batch in lanes) run at every batch size.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparse_cases import ALL_FORMATS, FORMATS, exact_dense, make_case, random_case, random_mask

from sparseforge import kernels

BATCHES = [1, 3, 17, 64, 257]
TOL = dict(rtol=2e-5, atol=2e-5)


def _dense(x, case, bias=None):
    return torch.nn.functional.linear(x, case.dense, bias)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("algo", ["rows", "lanes"])
def test_forward_matches_reference_and_dense(isa, fmt, algo):
    case = random_case(fmt, 45, 133, density=0.35, seed=1)
    bias = torch.randn(case.shape[0])
    for B in BATCHES:
        x = torch.randn(B, case.shape[1])
        y = case.run(x, bias, algo=algo)
        torch.testing.assert_close(y, case.ref(x, bias), **TOL)
        torch.testing.assert_close(y, _dense(x, case, bias), **TOL)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_transposed_matches_reference_and_dense(isa, fmt):
    case = random_case(fmt, 39, 101, density=0.4, seed=2)
    for B in (1, 3, 17, 70):
        dy = torch.randn(B, case.shape[0])
        dx = case.run_t(dy)
        torch.testing.assert_close(dx, case.ref_t(dy), **TOL)
        torch.testing.assert_close(dx, dy @ case.dense, **TOL)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_auto_algorithm_and_no_bias(isa, fmt):
    case = random_case(fmt, 64, 256, density=0.5, seed=3)
    for B in (1, 2, 4, 5, 64):
        x = torch.randn(B, case.shape[1])
        torch.testing.assert_close(case.run(x), _dense(x, case), **TOL)


@pytest.mark.parametrize("fmt", ["csr_u16", "bitmap", "bitmap_bf16", "nm_2of4"])
@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (2, 64), (5, 128), (4, 1024)])
def test_sizes_around_vector_widths(isa, fmt, shape):
    # column counts at / around the 8-, 16- and 64-column steps of the SIMD loops
    for delta in (-4, 0, 4, 8):
        cols = shape[1] + delta
        if cols < 4:
            continue
        case = random_case(fmt, shape[0], cols, density=0.6, seed=cols)
        x = torch.randn(2, case.shape[1])
        for algo in ("rows", "lanes"):
            torch.testing.assert_close(case.run(x, algo=algo), _dense(x, case), **TOL)


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_and_fully_dense_matrices(isa, fmt):
    kind = FORMATS[fmt][0]
    w = torch.randn(23, 48)
    empty = make_case(fmt, w, torch.zeros(23, 48, dtype=torch.bool))
    bias = torch.randn(23)
    for B in (1, 17):
        x = torch.randn(B, 48)
        for algo in ("rows", "lanes"):
            assert torch.equal(empty.run(x, algo=algo), torch.zeros(B, 23))
            torch.testing.assert_close(empty.run(x, bias, algo=algo), bias.expand(B, 23), rtol=0, atol=0)
    if kind != "nm":
        full = make_case(fmt, w, torch.ones(23, 48, dtype=torch.bool))
        x = torch.randn(5, 48)
        for algo in ("rows", "lanes"):
            torch.testing.assert_close(full.run(x, algo=algo), _dense(x, full), **TOL)


@pytest.mark.parametrize("fmt", FORMATS)
def test_degenerate_shapes(isa, fmt):
    case = random_case(fmt, 6, 24, seed=4)
    assert case.run(torch.randn(0, case.shape[1])).shape == (0, 6)
    assert case.run_t(torch.randn(0, 6)).shape == (0, case.shape[1])
    if FORMATS[fmt][0] != "nm":
        one = random_case(fmt, 5, 1, density=0.5, seed=5)
        x = torch.randn(3, 1)
        torch.testing.assert_close(one.run(x), _dense(x, one), **TOL)
        no_rows = random_case(fmt, 0, 7, seed=6)
        assert no_rows.run(torch.randn(2, 7)).shape == (2, 0)
        assert torch.equal(no_rows.run_t(torch.randn(2, 0)), torch.zeros(2, 7))


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("algo", ["rows", "lanes"])
def test_nan_and_inf_propagate_as_dense(isa, fmt, algo):
    case = random_case(fmt, 20, 64, density=0.3, seed=7)
    x = torch.randn(6, case.shape[1])
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")  # meets pruned weights in most rows: 0 * inf = NaN there, as dense
    x[3, 9] = -float("inf")
    x[3, 11] = float("inf")
    dense = case.dense.clone()
    y = case.run(x, algo=algo)
    torch.testing.assert_close(y, exact_dense(x, dense).float(), equal_nan=True, **TOL)
    torch.testing.assert_close(y, case.ref(x), equal_nan=True, **TOL)
    # non-finite stored values
    w = case.dense.clone()
    mask = w != 0
    r, c = mask.nonzero()[3].tolist()
    w[r, c] = float("inf")
    r2, c2 = mask.nonzero()[-1].tolist()
    w[r2, c2] = float("nan")
    bad = make_case(fmt, w, mask)
    x = torch.randn(3, case.shape[1])
    torch.testing.assert_close(bad.run(x, algo=algo), exact_dense(x, bad.dense).float(), equal_nan=True, **TOL)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_transposed_nan_and_inf_propagate_as_dense(isa, fmt):
    case = random_case(fmt, 20, 64, density=0.3, seed=8)
    dy = torch.randn(4, case.shape[0])
    dy[1, 3] = float("nan")
    dy[2, 4] = float("inf")
    dx = case.run_t(dy)
    ref = exact_dense(dy, case.dense.T.contiguous()).float()
    torch.testing.assert_close(dx, ref, equal_nan=True, **TOL)
    torch.testing.assert_close(case.ref_t(dy), ref, equal_nan=True, **TOL)


def test_thread_count_does_not_change_results():
    case = random_case("bitmap", 300, 200, seed=9)
    x = torch.randn(70, case.shape[1])
    n0 = kernels.num_threads()
    try:
        kernels.set_num_threads(1)
        one = [case.run(x, algo=a) for a in ("rows", "lanes")] + [case.run_t(x[:, :0].new_ones(70, 300))]
        kernels.set_num_threads(3)
        three = [case.run(x, algo=a) for a in ("rows", "lanes")] + [case.run_t(x[:, :0].new_ones(70, 300))]
    finally:
        kernels.set_num_threads(n0)
    for a, b in zip(one[:2], three[:2]):
        assert torch.equal(a, b)  # each output row is computed by one thread, in a fixed order
    torch.testing.assert_close(one[2], three[2], **TOL)  # dx sums per-thread partials


@pytest.mark.parametrize("fmt", ["bitmap", "bitmap_bf16", "nm_2of4", "nm_2of4_bf16"])
@pytest.mark.parametrize("rows,cols", [(1, 40), (2, 64), (7, 200), (301, 96)])
def test_batch1_row_walk_is_the_same_per_row_whatever_the_split(isa, fmt, rows, cols):
    """The batch-1 walks pair rows (r with r + half of a thread's range): each row's bits must not
    depend on its partner, on the thread count, or on the matrix around it."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols, generator=gen)
    mask = random_mask(fmt, rows, cols, 0.45, gen)
    case = make_case(fmt, w, mask)
    x = torch.randn(1, cols, generator=gen)
    bias = torch.randn(rows, generator=gen)
    n0 = kernels.num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            kernels.set_num_threads(threads)
            runs.append(case.run(x, bias, algo="rows"))
        alone = [make_case(fmt, w[r:r + 1], mask[r:r + 1]).run(x, bias[r:r + 1], algo="rows") for r in (0, rows // 2, rows - 1)]
    finally:
        kernels.set_num_threads(n0)
    assert all(torch.equal(runs[0], other) for other in runs[1:])
    for r, y in zip((0, rows // 2, rows - 1), alone):
        assert torch.equal(y[0, 0], runs[0][0, r]), r
    torch.testing.assert_close(runs[0], exact_dense(x, case.dense, bias).float(), **TOL)


@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(sorted(ALL_FORMATS)),
    rows=st.integers(1, 40),
    cols=st.integers(1, 150),
    batch=st.integers(1, 20),
    density=st.floats(0.0, 1.0),
    algo=st.sampled_from(["rows", "lanes"]),
    seed=st.integers(0, 2**16),
)
def test_property_sparse_matmul_equals_dense_on_masked_weight(fmt, rows, cols, batch, density, algo, seed):
    m = ALL_FORMATS[fmt][3]
    if m and cols < m:
        cols = m
    case = random_case(fmt, rows, cols, density, seed, special_rows=False)
    x = torch.randn(batch, case.shape[1], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(case.run(x, algo=algo), _dense(x, case), **TOL)
    dy = x[:, :1].expand(batch, case.shape[0])
    torch.testing.assert_close(case.run_t(dy.contiguous()), dy @ case.dense, **TOL)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("ref", [False, True])
def test_output_widths_must_match_the_weight(fmt, ref):
    case = random_case(fmt, 12, 32, density=0.5, seed=4)
    rows, cols = case.shape
    wrong = "one column per weight row|do not tile"  # BSR's view takes the row count from y / dy itself
    with pytest.raises(ValueError, match=wrong):
        case._call("linear" + ("_ref" if ref else ""), torch.randn(2, cols), None, torch.zeros(2, rows + 1))
    with pytest.raises(ValueError, match=wrong):
        case._call("linear_t" + ("_ref" if ref else ""), torch.randn(2, rows + 1), torch.zeros(2, cols))
