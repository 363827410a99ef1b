"""Row concatenation of every format (sparseforge.formats.concat): the buffers joined equal the dense rows stacked."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError
from sparseforge.formats import BitmapWeight, BSRWeight, FanInWeight, NMWeight, registry
from sparseforge.formats.colbitmap import ColumnBitmapWeight
from sparseforge.formats.concat import ConcatFallbackWarning, concat_rows
from sparseforge.formats.csr import CSRWeight
from sparseforge.nn import SparseLinear
from sparseforge.patterns import parse

# (format, value dtype, pattern) cells; cols / rows multiples each cell needs
CELLS = [
    ("bitmap", torch.float32, None), ("bitmap", torch.bfloat16, None), ("bitmap", torch.int8, None),
    ("nm", torch.float32, "2:4"), ("nm", torch.bfloat16, "4:8"), ("nm", torch.int8, "2:4"), ("nm", torch.float32, "1:3"),
    ("csr", torch.float32, None), ("csr", torch.bfloat16, None), ("csr", torch.int8, None),
    ("fanin", torch.float32, None), ("fanin", torch.bfloat16, None),
    ("bsr", torch.float32, "block2x4"), ("bsr", torch.bfloat16, "block1x1"), ("bsr", torch.float32, "block3x2"),
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so +0.0 / -0.0 and NaN payloads compare exactly)."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def _part(fmt: str, dtype: torch.dtype, pattern, rows: int, cols: int, density: float, k: int, gen) -> object:
    """A random ``fmt`` weight (rows, cols) whose pruned entries follow what the format needs."""
    w = torch.randn(rows, cols, generator=gen)  # (rows, cols)
    if fmt == "nm":
        n, m = (int(v) for v in pattern.split(":"))
        order = torch.rand(rows, cols // m, m, generator=gen).argsort(dim=-1)  # a random permutation per group
        keep = (order < n).reshape(rows, cols)
        keep &= torch.rand(rows, cols, generator=gen) < density  # some groups keep fewer than n
    elif fmt == "fanin":
        keep = torch.rand(rows, cols, generator=gen).argsort(dim=1) < k  # exactly k per row
    elif fmt == "bsr":
        h, bw = (int(v) for v in pattern.removeprefix("block").split("x"))
        on = torch.rand(rows // h, cols // bw, generator=gen) < density
        keep = on.repeat_interleave(h, 0).repeat_interleave(bw, 1) & (torch.rand(rows, cols, generator=gen) < 0.9)
    else:
        keep = torch.rand(rows, cols, generator=gen) < density
    w = torch.where(keep, w, torch.zeros(()))
    spec = registry.get(fmt)
    parsed = None if pattern is None else parse(pattern)
    if dtype == torch.int8:
        return spec.build(w, parsed, keep, values_dtype=torch.int8)
    return spec.build(w.to(dtype), parsed, keep)


def _row_step(fmt: str, pattern) -> int:
    return int(pattern.removeprefix("block").split("x")[0]) if fmt == "bsr" else 1


def _col_step(fmt: str, pattern) -> int:
    if fmt == "nm":
        return int(pattern.split(":")[1])
    return int(pattern.removeprefix("block").split("x")[1]) if fmt == "bsr" else 1


@settings(max_examples=120, deadline=None)
@given(cell=st.sampled_from(CELLS), row_units=st.lists(st.integers(0, 7), min_size=1, max_size=4),
       col_units=st.integers(1, 23), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_concat_rows_equals_the_dense_rows_stacked_bit_for_bit(cell, row_units, col_units, density, seed):
    fmt, dtype, pattern = cell
    gen = torch.Generator().manual_seed(seed)
    cols = col_units * _col_step(fmt, pattern)
    k = int(torch.randint(0, cols + 1, (1,), generator=gen))
    parts = [_part(fmt, dtype, pattern, r * _row_step(fmt, pattern), cols, density, k, gen) for r in row_units]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConcatFallbackWarning)  # every format the engine fuses joins its buffers
        joined = concat_rows(parts)
    assert type(joined) is type(parts[0])
    expected = torch.cat([p.to_dense() for p in parts])  # (sum rows, cols)
    got = joined.to_dense()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(_bits(got), _bits(expected))
    assert joined.dtype == parts[0].dtype and joined.nnz == sum(p.nnz for p in parts)
    assert torch.equal(joined.mask(), torch.cat([p.mask() for p in parts]))
    # it survives the checkpoint path: rebuilt from its own buffers, it validates and is the same weight
    spec = registry.spec_of(joined)
    again = spec.load(joined.state_dict(), joined.shape, spec.pattern_of(joined))
    for f in dataclasses.fields(joined):  # every field, derived ones (bitmap row offsets) included
        mine, checked = getattr(joined, f.name), getattr(again, f.name)
        if isinstance(mine, torch.Tensor):
            assert mine.dtype == checked.dtype and torch.equal(mine, checked), f.name
        else:
            assert mine == checked, f.name


@settings(max_examples=40, deadline=None)
@given(cell=st.sampled_from([c for c in CELLS if c[0] != "bsr" or c[2] == "block1x1"]),
       rows=st.lists(st.integers(1, 40), min_size=2, max_size=3), col_units=st.integers(1, 40),
       batch=st.sampled_from([1, 2, 5]), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_the_fused_layer_outputs_the_separate_layers_outputs_concatenated(cell, rows, col_units, batch, bias, seed):
    fmt, dtype, pattern = cell
    gen = torch.Generator().manual_seed(seed)
    cols = col_units * _col_step(fmt, pattern)
    k = int(torch.randint(1, cols + 1, (1,), generator=gen))
    parts = [_part(fmt, dtype, pattern, r, cols, 0.4, k, gen) for r in rows]
    biases = [torch.randn(r, generator=gen) if bias else None for r in rows]
    layers = [SparseLinear(p, b) for p, b in zip(parts, biases)]
    fused = SparseLinear(concat_rows(parts), torch.cat(biases) if bias else None)
    x = torch.randn(batch, cols, generator=gen)
    with torch.no_grad():
        expected = torch.cat([layer(x) for layer in layers], dim=-1)  # (batch, sum rows)
        got = fused(x)
    if batch == 1:  # one dot product per row, each summed as the separate layer sums it
        assert torch.equal(got, expected)
    else:  # the lanes kernels' column tile follows the density: float32 summation order may differ
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_format_a_sparse_linear_runs_joins_its_own_buffers():
    for name in registry.names(sparse_linear=True):
        assert callable(getattr(registry.get(name).cls, "concat_rows", None)), name


def test_a_format_without_its_own_concat_is_joined_by_densifying_and_says_so():
    ws = [ColumnBitmapWeight.from_dense(torch.tensor([[1.0, 0.0], [0.0, 2.0]])),
          ColumnBitmapWeight.from_dense(torch.tensor([[0.0, -3.0]]))]
    assert not hasattr(ColumnBitmapWeight, "concat_rows")
    with pytest.warns(ConcatFallbackWarning, match="'colbitmap'.*densifying"):
        joined = concat_rows(ws)
    assert torch.equal(joined.to_dense(), torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, -3.0]]))


@pytest.mark.parametrize("parts, match", [
    ([], "at least one"),
    ([BitmapWeight.from_dense(torch.eye(2)), CSRWeight.from_dense(torch.eye(2))], "part 1 is a CSRWeight"),
    ([BitmapWeight.from_dense(torch.eye(2)), BitmapWeight.from_dense(torch.eye(3))], "part 1 has 3 columns"),
    ([BitmapWeight.from_dense(torch.eye(2)), BitmapWeight.from_dense(torch.eye(2).bfloat16())], "one value dtype"),
    ([NMWeight.from_dense(torch.eye(8), "2:4"), NMWeight.from_dense(torch.eye(8), "2:8")], "one N:M pattern"),
    ([FanInWeight.from_dense(torch.eye(4)), FanInWeight.from_dense(torch.ones(1, 4))], "one k"),
    ([BSRWeight.from_dense(torch.ones(2, 2), "block2x2"), BSRWeight.from_dense(torch.ones(2, 2), "block1x1")],
     "one block size"),
])
def test_parts_that_cannot_be_stacked_are_refused_with_the_reason(parts, match):
    with pytest.raises(ConfigError, match=match):
        concat_rows(parts)
