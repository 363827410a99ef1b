"""Sibling column-sparse products in one call (csrc/column_sparse.h: column_sparse_linear_group, bound by
sparseforge.ops.column_sparse.bind_group): every member's output bitwise the one its own call gives, each
with its own threshold (TEAL: q / k / v and gate / up share an input, not a threshold); against the scalar
reference and dense torch; every ISA path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from input_sparse_cases import at_thread_counts, random_problem, raw
from input_sparse_cases import tol as _tol

from sparseforge.errors import ModelError
from sparseforge.formats.colbitmap import ColumnBitmapWeight
from sparseforge.kernels import native
from sparseforge.ops.column_sparse import bind_group, column_sparse_reference, kernel_args


def _member(n_in, n_out, dtype, seed, thr, bias=True, weight_sparsity=0.5):
    """(ColumnBitmapWeight, thresholds, bias or None) of one member."""
    _, w, b = random_problem(1, n_in, n_out, seed, weight_sparsity)  # w (out, in)
    if dtype == torch.int8:
        weight = ColumnBitmapWeight.from_dense(w, values_dtype=torch.int8)  # one scale per output row
    else:
        weight = ColumnBitmapWeight.from_dense(w.to(dtype))
    return weight, thr, (b if bias else None)


def _spec(member):
    w, thr, bias = member
    return (w.bitmap, w.block_ptr, w.values, thr, bias, w.shape[0], w.scales)


def _alone(x, member):
    """The member's own call (kernel_args, as a ColumnSparseLinear's bound batch-1 product runs it)."""
    w, thr, bias = member
    kernel, *views = kernel_args(w.bitmap, w.block_ptr, w.values, w.shape[0], w.scales)
    y = torch.empty(x.shape[0], w.shape[0])
    kernel(x.numpy(), *views, thr.numpy(), None if bias is None else bias.numpy(), y.numpy())
    return y


def _ref(x, member):
    """The scalar oracle (native, plain loops over the bits)."""
    w, thr, bias = member
    y = torch.empty(x.shape[0], w.shape[0])
    native().column_sparse_linear_ref(x.numpy(), w.bitmap.numpy(), w.block_ptr.numpy(), raw(w.values), thr.numpy(),
                                      None if bias is None else bias.numpy(), y.numpy(),
                                      None if w.scales is None else w.scales.numpy())
    return y


def _grouped(x, members):
    group = bind_group([_spec(m) for m in members])
    y = torch.empty(x.shape[0], sum(m[0].shape[0] for m in members))
    group(x.numpy(), y.numpy())
    return y


# q / k / v and gate / up shapes of a small GQA block, a wide member (several 8192-column tiles), odd sizes
SHAPES = [(256, (256, 64, 64)), (200, (700, 700)), (300, (9000, 17)), (64, (1,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("n_in,outs", SHAPES)
def test_each_member_is_bitwise_its_own_call_and_matches_reference_and_dense(isa, dtype, n_in, outs):
    x = torch.randn(1, n_in, generator=torch.Generator().manual_seed(7))
    thresholds = [torch.tensor([t]) for t in (0.67, 0.3, 1.1)]  # each member its own
    members = [_member(n_in, o, dtype, seed=i, thr=thresholds[i % 3], bias=i != 1) for i, o in enumerate(outs)]
    y = _grouped(x, members)
    for part, m in zip(y.split(list(outs), dim=1), members):
        assert torch.equal(part, _alone(x, m))
        torch.testing.assert_close(part, _ref(x, m), **_tol(n_in))
        w, thr, bias = m
        dense = w.to_dense().float()  # (out, in), int8 values times their row scales
        torch.testing.assert_close(part, column_sparse_reference(x, ColumnBitmapWeight.from_dense(dense), thr, bias),
                                   **_tol(n_in))


def test_separate_thresholds_are_applied_per_member(isa):
    """The same weight twice with different thresholds: the outputs differ as their own calls do."""
    w, _, bias = _member(128, 96, torch.float32, seed=3, thr=None)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(1))
    low, high = (w, torch.tensor([0.0]), bias), (w, torch.tensor([1.0]), bias)
    y = _grouped(x, [low, high])
    assert torch.equal(y[:, :96], _alone(x, low))
    torch.testing.assert_close(y[:, :96], torch.nn.functional.linear(x, w.to_dense(), bias), **_tol(128))
    assert torch.equal(y[:, 96:], _alone(x, high))
    assert not torch.equal(y[:, :96], y[:, 96:])


def test_per_channel_thresholds_and_an_in_place_change_is_seen(isa):
    members = [_member(100, o, torch.float32, seed=o, thr=torch.rand(100) * 1.5) for o in (48, 600)]
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(2))
    group = bind_group([_spec(m) for m in members])
    y = torch.empty(1, 648)
    group(x.numpy(), y.numpy())
    assert torch.equal(y, torch.cat([_alone(x, m) for m in members], dim=1))
    members[0][1].fill_(math.inf)  # the bound thresholds are the tensors' memory
    group(x.numpy(), y.numpy())
    assert torch.equal(y[:, :48], members[0][2].expand(1, 48))  # every channel skipped: the bias
    assert torch.equal(y[:, 48:], _alone(x, members[1]))


def test_several_rows_match_the_members_own_calls(isa):
    members = [_member(129, o, torch.float32, seed=o, thr=torch.tensor([0.5])) for o in (77, 513)]
    x = torch.randn(5, 129, generator=torch.Generator().manual_seed(4))
    assert torch.equal(_grouped(x, members), torch.cat([_alone(x, m) for m in members], dim=1))


def test_thread_count_does_not_change_results():
    members = [_member(1100, o, torch.float32, seed=o, thr=torch.tensor([0.3])) for o in (2048, 512, 512)]
    x = torch.randn(1, 1100, generator=torch.Generator().manual_seed(5))
    one, three = at_thread_counts(lambda: _grouped(x, members))
    assert torch.equal(one, three)


def test_nan_and_inf_inputs_propagate(isa):
    members = [_member(64, o, torch.float32, seed=o, thr=torch.tensor([0.5])) for o in (40, 24)]
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(6))
    x[0, 3], x[0, 9] = math.nan, math.inf
    y = _grouped(x, members)
    assert torch.equal(y.isnan(), torch.cat([_alone(x, m) for m in members], dim=1).isnan())
    assert bool(y.isnan().any())


def test_bad_groups_are_clear_errors():
    a = _member(64, 16, torch.float32, seed=0, thr=torch.tensor([0.5]))
    b = _member(32, 16, torch.float32, seed=1, thr=torch.tensor([0.5]))
    with pytest.raises(ModelError, match="share the input size"):
        bind_group([_spec(a), _spec(b)])
    with pytest.raises(ModelError, match="at least one member"):
        bind_group([])
    with pytest.raises(ModelError, match="thresholds must have 1 or in_features"):
        bind_group([_spec((a[0], torch.zeros(3), None))])
    w = a[0]
    bad = (w.bitmap, w.block_ptr.clone(), w.values, a[1], None, 16, None)
    bad[1][1] += 1  # block_ptr no longer counts the bitmap's bits
    with pytest.raises(ModelError, match="block_ptr"):
        bind_group([bad])
    group = bind_group([_spec(a)])
    with pytest.raises(ValueError, match="x must be"):
        group(torch.zeros(1, 63).numpy(), torch.zeros(1, 16).numpy())
    with pytest.raises(ValueError, match="x must be"):
        group(torch.zeros(1, 64).numpy(), torch.zeros(1, 15).numpy())


@settings(max_examples=30, deadline=None)
@given(n_in=st.integers(1, 300), outs=st.lists(st.integers(1, 1200), min_size=1, max_size=3),
       thr=st.lists(st.sampled_from([0.0, 0.3, 0.8, math.inf]), min_size=3, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_property_group_equals_the_members_alone(n_in, outs, thr, dtype, seed):
    x = torch.randn(1, n_in, generator=torch.Generator().manual_seed(seed))
    members = [_member(n_in, o, dtype, seed=seed + i, thr=torch.tensor([thr[i]])) for i, o in enumerate(outs)]
    assert torch.equal(_grouped(x, members), torch.cat([_alone(x, m) for m in members], dim=1))
