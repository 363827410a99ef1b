"""ops.linear's eager fast path (native kernel called directly, weight buffers validated once per
format object) against the registered op, plus its checks and copy/pickle safety."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from test_kernel_ops import WEIGHTS, _op_args, _weight

from sparseforge import ops
from sparseforge.errors import DataError, ModelError
from sparseforge.formats import NMWeight


@pytest.mark.parametrize("name", WEIGHTS)
def test_fast_path_equals_registered_op_bitwise(name):
    weight, _ = _weight(name)
    x, bias = torch.randn(3, weight.shape[1]), torch.randn(weight.shape[0])
    op, args = _op_args(weight, x, bias)
    with torch.no_grad():
        fast = ops.linear(x, weight, bias)
        again = ops.linear(x.reshape(3, 1, -1), weight, bias)  # cached kernel arguments, leading dims
    assert "_kernel_args" in weight.__dict__
    assert torch.equal(fast, op(*args)) and torch.equal(again.reshape(3, -1), fast)


def test_fast_path_still_checks_activations_and_bias():
    weight, _ = _weight("nm_2of4")
    x = torch.randn(2, weight.shape[1])
    with torch.no_grad():
        with pytest.raises(DataError, match="float32"):
            ops.linear(x.double(), weight)
        with pytest.raises(DataError, match="bias"):
            ops.linear(x, weight, torch.zeros(weight.shape[0] + 1))
        with pytest.raises(DataError, match="contiguous"):
            ops.linear(torch.randn(weight.shape[1], 2).t(), weight)


def test_fast_path_validates_buffers_once():
    w = NMWeight.from_dense(torch.tensor([[0., 1., 0., 2.]]), "2:4")
    strided = torch.zeros(1, 4)[:, ::2]  # (1, 2) non-contiguous values: the native call must not see them
    with pytest.raises(ModelError, match="contiguous"):
        ops.linear(torch.ones(1, 4), NMWeight((1, 4), w.pattern, strided, w.indices))


def test_in_place_updates_are_seen_and_copies_get_their_own_views():
    w = NMWeight.from_dense(torch.tensor([[0., 1., 0., 2.]]), "2:4")
    x = torch.ones(1, 4)
    assert ops.linear(x, w).item() == 3.0
    w.values.mul_(2)  # the cached numpy views share memory with the buffers
    assert ops.linear(x, w).item() == 6.0
    for clone in (copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
        assert "_kernel_args" not in clone.__dict__
        clone.values.mul_(10)
        assert ops.linear(x, clone).item() == 60.0
    assert ops.linear(x, w).item() == 6.0


def test_replaced_storage_is_revalidated():
    """``param.data = ...`` (what Module.half() / .to() do to trainable values) must not leave the
    fast path reading the old storage."""
    from sparseforge.nn import SparseLinear

    lin = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.mul_(torch.tensor([1., 0.] * 4))
    sl = SparseLinear.from_linear(lin, format="nm", pattern="2:4", trainable=True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = sl(x)
        values = sl.weight_format.values
        values.data = values.data * 2  # same Parameter object, new storage
        torch.testing.assert_close(sl(x), 2 * before)
        values.data = values.data.half()
        with pytest.raises(ModelError, match="float32 or bfloat16"):
            sl(x)
