"""The lanes kernels' tile parameters (col_tile, block_rows; csrc/driver.h lanes_rows) change the
speed, never the result: every value gives the built-in rule's output, bit for bit for the row block
(it only divides the rows among tasks) and within float32 summation order for the column tile (it
splits each row's dot product into per-tile partial sums); and every value matches the scalar
reference and dense torch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparse_cases import FORMATS, STRUCTURED, random_case

from sparseforge import kernels, ops
from sparseforge.errors import ConfigError
from sparseforge.formats import BitmapWeight, FanInWeight
from sparseforge.nn import SparseLinear

TILED = [f for f in FORMATS] + [f for f in STRUCTURED if f.startswith("bsr")]
COL_TILES = [64, 128, 192, 512, 1024]
BLOCK_ROWS = [1, 7, 16, 64, 256]


def _tol(cols):
    return dict(rtol=1e-5, atol=2e-6 * cols)


@pytest.mark.parametrize("fmt", TILED)
@pytest.mark.parametrize("batch", [4, 17, 64, 130])
def test_every_tile_gives_the_rules_result(isa, fmt, batch):
    case = random_case(fmt, 300, 700, density=0.3, seed=batch)
    x = torch.randn(batch, case.shape[1], generator=torch.Generator().manual_seed(1))
    bias = torch.randn(case.shape[0])
    rule = case.run(x, bias, algo="lanes")
    torch.testing.assert_close(rule, case.ref(x, bias), **_tol(case.shape[1]))
    torch.testing.assert_close(rule, torch.nn.functional.linear(x, case.dense, bias), **_tol(case.shape[1]))
    for rows in BLOCK_ROWS:
        assert torch.equal(case.run(x, bias, algo="lanes", block_rows=rows), rule), rows
    for cols in COL_TILES:
        y = case.run(x, bias, algo="lanes", col_tile=cols)
        torch.testing.assert_close(y, rule, **_tol(case.shape[1]))
        assert torch.equal(case.run(x, bias, algo="lanes", col_tile=cols, block_rows=5), y)


def test_tiles_do_not_touch_the_rows_kernels():
    case = random_case("bitmap", 64, 300, seed=3)
    x = torch.randn(3, 300)
    assert torch.equal(case.run(x, algo="rows", col_tile=64, block_rows=3), case.run(x, algo="rows"))


def test_thread_count_and_tile_together_do_not_change_results():
    case = random_case("csr_u16", 512, 1000, density=0.1, seed=4)
    x = torch.randn(64, 1000)
    before = kernels.num_threads()
    try:
        outs = []
        for n in (1, 3):
            kernels.set_num_threads(n)
            outs.append(case.run(x, block_rows=32))
            outs.append(case.run(x))
    finally:
        kernels.set_num_threads(before)
    assert all(torch.equal(outs[0], y) for y in outs[1:])


@pytest.mark.parametrize("fmt", ["bitmap", "csr_u16"])
def test_row_block_buffers_per_worker_match_one_thread(isa, fmt):
    # each worker's partial sums (ybuf) hold one row block, sized by the block in use: with several
    # workers and blocks from 1 row to kMaxBlockRows, rows of one worker never reach another's sums
    case = random_case(fmt, 700, 1100, density=0.2, seed=5)
    x = torch.randn(64, 1100, generator=torch.Generator().manual_seed(2))
    before = kernels.num_threads()
    try:
        kernels.set_num_threads(1)
        single = {rows: case.run(x, algo="lanes", col_tile=128, block_rows=rows) for rows in (1, 33, 256)}
        kernels.set_num_threads(4)
        for rows, want in single.items():
            assert torch.equal(case.run(x, algo="lanes", col_tile=128, block_rows=rows), want), rows
    finally:
        kernels.set_num_threads(before)
    torch.testing.assert_close(single[33], torch.nn.functional.linear(x, case.dense), **_tol(1100))


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(TILED), rows=st.integers(1, 300), cols=st.integers(1, 1200), batch=st.integers(4, 80),
       col_tile=st.sampled_from([0] + COL_TILES), block_rows=st.integers(0, 256), seed=st.integers(0, 2**16))
def test_property_tile_is_invisible(fmt, rows, cols, batch, col_tile, block_rows, seed):
    case = random_case(fmt, rows, cols, density=0.5, seed=seed)
    x = torch.randn(batch, case.shape[1], generator=torch.Generator().manual_seed(seed))
    y = case.run(x, algo="lanes", col_tile=col_tile, block_rows=block_rows)
    rule_cols = case.run(x, algo="lanes", col_tile=col_tile)
    assert torch.equal(y, rule_cols)  # the row block never changes a bit
    torch.testing.assert_close(y, case.run(x, algo="lanes"), **_tol(case.shape[1]))
    torch.testing.assert_close(y, case.ref(x), **_tol(case.shape[1]))


def test_bad_tiles_are_clear_errors():
    case = random_case("bitmap", 8, 64)
    x = torch.randn(4, 64)
    for kw in ({"col_tile": 100}, {"col_tile": 2048}, {"col_tile": -64}, {"block_rows": 257}, {"block_rows": -1}):
        with pytest.raises(ValueError, match="col_tile|block_rows"):
            case.run(x, **kw)
    w = BitmapWeight.from_dense(torch.randn(8, 64))
    with pytest.raises(ConfigError, match="col_tile must be 0 .* multiple of 64"):
        ops.linear(x, w, col_tile=96)
    with pytest.raises(ConfigError, match="block_rows must be 0"):
        ops.linear(x, w, block_rows=1000)
    fan = FanInWeight.from_dense(torch.randn(8, 64), torch.rand(8, 64).argsort(1) < 8)
    with pytest.raises(ConfigError, match="not fanin"):
        ops.linear(x, fan, col_tile=128)
    q = SparseLinear.from_linear(torch.nn.Linear(64, 8), "bitmap", dtype=torch.int8).weight_format
    with pytest.raises(ConfigError, match="int8"):
        ops.linear(x, q, block_rows=4)


def test_ops_linear_passes_the_tile_on():
    w = BitmapWeight.from_dense(torch.randn(200, 640) * (torch.rand(200, 640) > 0.5))
    x = torch.randn(64, 640)
    rule = ops.linear(x, w)
    for cols, rows in ((64, 0), (1024, 0), (0, 1), (256, 33)):
        torch.testing.assert_close(ops.linear(x, w, col_tile=cols, block_rows=rows), rule, **_tol(640))
    assert torch.equal(ops.linear(x, w, block_rows=3), rule)
