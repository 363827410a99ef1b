"""Constant fan-in and BSR kernels: the cases their constrained masks need (all-zero / full
matrices, int32 indices). The shape-agnostic and property tests of test_native_kernels.py
(forward, transposed, NaN/inf, every ISA and algorithm) run over these formats too."""

from __future__ import annotations

import pytest
import torch
from sparse_cases import STRUCTURED, make_case, random_case

from sparseforge import kernels

TOL = dict(rtol=1e-4, atol=1e-4)


def _dense(x, case, bias=None):
    return torch.nn.functional.linear(x, case.dense, bias)


@pytest.mark.parametrize("fmt", STRUCTURED)
def test_all_zero_fully_dense_and_empty_batch(isa, fmt):
    case = random_case(fmt, 24, 80, seed=3)
    rows, cols = case.shape
    w = torch.randn(rows, cols)
    empty = make_case(fmt, w, torch.zeros(rows, cols, dtype=torch.bool))
    full = make_case(fmt, w, torch.ones(rows, cols, dtype=torch.bool))
    bias = torch.randn(rows)
    for B in (1, 17):
        x = torch.randn(B, cols)
        for algo in ("rows", "lanes"):
            torch.testing.assert_close(empty.run(x, bias, algo=algo), bias.expand(B, rows), rtol=0, atol=0)
            torch.testing.assert_close(full.run(x, algo=algo), _dense(x, full), **TOL)
    assert case.run(torch.randn(0, cols)).shape == (0, rows)
    assert case.run_t(torch.randn(0, rows)).shape == (0, cols)


def test_wide_layers_use_int32_indices():
    # more than 65536 columns (fan-in) / block columns (1x1 BSR): int32 indices, same results
    for fmt in ("fanin", "bsr_1x1"):
        case = random_case(fmt, 3, 70000, density=0.001, seed=11)
        assert case.bufs[-1 if fmt == "fanin" else 1].dtype == torch.int32
        x = torch.randn(2, 70000)
        torch.testing.assert_close(case.run(x), _dense(x, case), **TOL)


@pytest.mark.parametrize("fmt", ["bsr_3x5_bf16", "bsr_4x4", "bsr_8x2", "fanin"])
def test_threaded_row_chunks_that_split_blocks(fmt):
    # 300 rows in ~10-row tasks: chunk edges fall inside 3-, 4- and 8-row block rows
    from sparseforge.kernels import native

    case = random_case(fmt, 300, 240, density=0.5, seed=12)
    rows, cols = case.shape
    x = torch.randn(9, cols)
    dy = torch.randn(9, rows)
    n0 = kernels.num_threads()
    try:
        for n in (2, 3):
            kernels.set_num_threads(n)
            for algo in ("rows", "lanes"):
                torch.testing.assert_close(case.run(x, algo=algo), case.ref(x), **TOL)
            torch.testing.assert_close(case.run_t(dy), case.ref_t(dy), **TOL)
            kind = "bsr" if fmt.startswith("bsr") else "fanin"
            values = case.bufs[-1] if kind == "bsr" else case.bufs[0]
            dw, ref = torch.empty(values.shape), torch.empty(values.shape)
            getattr(native(), f"{kind}_sddmm")(x, dy, *case.bufs, dw)
            getattr(native(), f"{kind}_sddmm_ref")(x, dy, *case.bufs, ref)
            torch.testing.assert_close(dw, ref, **TOL)
    finally:
        kernels.set_num_threads(n0)
